/*
 * corral-agent: pid 1 of every sandbox and the server the host talks to.
 *
 * One operation per connection; framing and operations are described in docs/agent-protocol.md.
 * Process operations run in a single-threaded epoll loop. File operations are handed to a
 * forked helper that does plain blocking I/O on the connection and exits, so a slow disk, a huge
 * directory or a slow host reader never stalls exec. Everything inside the sandbox is hostile:
 * every length is bounded, files we read (/etc/passwd, /etc/group) are size-capped and must be
 * regular, and every fd we own is close-on-exec.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "0.1.0"
#define PROTOCOL_VERSION "1"

#define HDR 5                       /* u32 payload length (big endian) + u8 type */
#define MAX_PAYLOAD (1u << 20)
#define OUT_CHUNK (64u * 1024)      /* process output per frame */
#define FILE_CHUNK (256u * 1024)    /* file data per frame */
#define RING_MIN (16u * 1024)
#define RING_MAX (1u << 20)         /* replay kept per stream */
#define OUT_HIGH (256u * 1024)      /* stop producing output frames for a connection above this */
#define KEEP_EXITED 64
#define MAX_CONNS 4096
#define MAX_PROCS 4096
#define DRAIN_GRACE_MS 100
#define DRAIN_BUDGET (1u << 20)     /* read at most this much more once draining starts */
#define LISTEN_RETRY_MS 100
#define MAX_LIST_DEPTH 64
#define MAX_RM_DEPTH 256
#define MAX_GROUPS 256
#define ID_FILE_MAX (8u << 20)
#define MAX_TAG 1024
#define MAX_WATCHES 8192            /* directories one recursive WATCH may watch */
#define WATCH_SLOTS 16384           /* wd table slots: a power of two above twice MAX_WATCHES */
#define MAX_WATCH_DEPTH 256
#define MOVE_PAIR_MS 20             /* how long a directory's MOVED_FROM waits for its MOVED_TO */
#define ROOT_CHECK_MS 250           /* how often a watch looks whether its directory was removed */
#define XATTR_PREFIX "user.e2b."  /* file metadata: xattrs in this namespace, prefix dropped */
#define XATTR_PREFIX_LEN (sizeof XATTR_PREFIX - 1)
#define MAX_XATTRS 64               /* per file, both ways */
#define XATTR_BUDGET (64u * 1024)   /* key + value bytes per file, both ways */
#define XATTR_KEY_MAX 200           /* what WRITE accepts */
#define XATTR_VALUE_MAX 4096
#define XATTR_LIST_BUF 65536        /* the kernel's XATTR_LIST_MAX */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Frame types. */
enum {
    T_PING = 1, T_SPAWN = 2, T_ATTACH = 3, T_WAIT = 4, T_LIST = 5, T_STDIN = 6,
    T_CLOSE_STDIN = 7, T_SIGNAL = 8, T_RESIZE = 9, T_SETENV = 10,
    T_STAT = 16, T_LISTDIR = 17, T_READ = 18, T_WRITE = 19, T_MKDIR = 20, T_REMOVE = 21,
    T_RENAME = 22, T_SYMLINK = 23, T_WATCH = 24,
    T_DATA = 32, T_END = 33,
    T_OK = 128, T_ERROR = 129, T_STDOUT = 130, T_STDERR = 131, T_EXIT = 132, T_ENTRY = 133,
    T_EVENT = 134,
};

/* Field keys inside a TLV payload. */
enum {
    F_ARG = 1, F_ENV = 2, F_CWD = 3, F_USER = 4, F_ROWS = 5, F_COLS = 6, F_STDIN = 7, F_TAG = 8,
    F_ATTACH = 9, F_PID = 10, F_REPLAY = 11, F_SIGNO = 12, F_PATH = 13, F_BENEATH = 14,
    F_DEPTH = 15, F_MODE = 16, F_PARENTS = 17, F_RECURSIVE = 18, F_DST = 19, F_TARGET = 20,
    F_DATA = 21, F_EXIT = 22, F_CODE = 23, F_MSG = 24, F_NAME = 25, F_TYPE = 26, F_SIZE = 27,
    F_MTIME = 28, F_UID = 29, F_GID = 30, F_LINK = 31, F_RUNNING = 32, F_PTY = 33,
    F_STARTED = 34, F_VERSION = 35, F_PROTOCOL = 36, F_KIND = 37, F_XATTR = 38,
};

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_BENEATH 0x08

struct open_how_ {
    uint64_t flags, mode, resolve;
};

/* ------------------------------------------------------------------ small utilities */

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        /* Out of memory in pid 1 has no good answer; dying loudly beats corrupting state. */
        static const char m[] = "corral-agent: out of memory\n";
        if (write(2, m, sizeof m - 1) < 0) { /* nothing left to do */ }
        abort();
    }
    return q;
}

static char *xstrndup(const char *s, size_t n) {
    char *d = xrealloc(NULL, n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static int64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void set_cloexec_nonblock(int fd, int nonblock) {
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, nonblock ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

/* ------------------------------------------------------------------ output buffers and frames */

struct buf {
    uint8_t *d;
    size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t nc = b->cap ? b->cap : 256;
    while (nc < b->len + extra) nc *= 2;
    b->d = xrealloc(b->d, nc);
    b->cap = nc;
}

static void buf_put(struct buf *b, const void *p, size_t n) {
    buf_reserve(b, n);
    if (n) memcpy(b->d + b->len, p, n);
    b->len += n;
}

static size_t frame_begin(struct buf *b, int type) {
    size_t at = b->len;
    uint8_t h[HDR] = {0, 0, 0, 0, (uint8_t)type};
    buf_put(b, h, HDR);
    return at;
}

static void frame_end(struct buf *b, size_t at) {
    put_be32(b->d + at, (uint32_t)(b->len - at - HDR));
}

static void field_bytes(struct buf *b, int key, const void *p, size_t n) {
    uint8_t h[5] = {(uint8_t)key};
    put_be32(h + 1, (uint32_t)n);
    buf_put(b, h, 5);
    buf_put(b, p, n);
}

static void field_str(struct buf *b, int key, const char *s) {
    field_bytes(b, key, s, strlen(s));
}

static void field_int(struct buf *b, int key, int64_t v) {
    uint8_t p[8];
    uint64_t u = (uint64_t)v;
    for (int i = 7; i >= 0; i--) { p[i] = (uint8_t)u; u >>= 8; }
    field_bytes(b, key, p, 8);
}

static void frame_error(struct buf *b, const char *code, const char *msg) {
    size_t at = frame_begin(b, T_ERROR);
    field_str(b, F_CODE, code);
    field_str(b, F_MSG, msg);
    frame_end(b, at);
}

/* ------------------------------------------------------------------ request fields (TLV) */

struct fields {
    const uint8_t *p;
    size_t n;
};

static int fields_valid(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (n - i < 5) return 0;
        uint32_t len = get_be32(p + i + 1);
        if (len > n - i - 5) return 0;
        i += 5 + (size_t)len;
    }
    return 1;
}

/* The idx-th occurrence of key; 1 if present. */
static int field_get(const struct fields *f, int key, int idx, const uint8_t **v, size_t *vn) {
    size_t i = 0;
    while (i + 5 <= f->n) {
        uint32_t len = get_be32(f->p + i + 1);
        if (f->p[i] == key && idx-- == 0) {
            *v = f->p + i + 5;
            *vn = len;
            return 1;
        }
        i += 5 + (size_t)len;
    }
    return 0;
}

static int field_count(const struct fields *f, int key) {
    int n = 0;
    const uint8_t *v;
    size_t vn;
    while (field_get(f, key, n, &v, &vn)) n++;
    return n;
}

/* A NUL-free string field copied out; NULL when absent. *bad set when present but malformed. */
static char *field_strdup(const struct fields *f, int key, int idx, int *bad) {
    const uint8_t *v;
    size_t vn;
    if (!field_get(f, key, idx, &v, &vn)) return NULL;
    if (memchr(v, 0, vn)) {
        *bad = 1;
        return NULL;
    }
    return xstrndup((const char *)v, vn);
}

/* 1 if present and well formed (8 bytes, big endian), 0 if absent, -1 if malformed. */
static int field_i64(const struct fields *f, int key, int64_t *out) {
    const uint8_t *v;
    size_t vn;
    if (!field_get(f, key, 0, &v, &vn)) return 0;
    if (vn != 8) return -1;
    uint64_t u = 0;
    for (int i = 0; i < 8; i++) u = (u << 8) | v[i];
    *out = (int64_t)u;
    return 1;
}

static int64_t field_i64_or(const struct fields *f, int key, int64_t dflt, int *bad) {
    int64_t v;
    int r = field_i64(f, key, &v);
    if (r < 0) *bad = 1;
    return r > 0 ? v : dflt;
}

/* ------------------------------------------------------------------ users and groups */

struct ident {
    uid_t uid;
    gid_t gid;
    char name[256];
    char home[PATH_MAX];
    gid_t groups[MAX_GROUPS];
    int ngroups;
};

/* Reads a small regular file; a missing or odd file reads as empty. The caller frees. */
static char *load_id_file(const char *path, size_t *len) {
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) return NULL;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return NULL;
    }
    size_t cap = (size_t)st.st_size + 1;
    if (cap > ID_FILE_MAX) cap = ID_FILE_MAX;
    char *d = xrealloc(NULL, cap);
    while (*len < cap - 1) {
        ssize_t n = read(fd, d + *len, cap - 1 - *len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        *len += (size_t)n;
    }
    close(fd);
    d[*len] = 0;
    return d;
}

/* Splits one line into at most max ':'-separated fields, in place. */
static int split_colon(char *line, char **f, int max) {
    int n = 0;
    f[n++] = line;
    for (char *p = line; *p && n < max; p++) {
        if (*p == ':') {
            *p = 0;
            f[n++] = p + 1;
        }
    }
    return n;
}

static int parse_id(const char *s, unsigned long *out) {
    if (!*s || strlen(s) > 10) return 0;
    unsigned long v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9') return 0;
        v = v * 10 + (unsigned long)(*p - '0');
    }
    if (v >= 0xffffffffUL) return 0;
    *out = v;
    return 1;
}

/* Calls fn for every line (NUL-terminated copy, at most 4 KiB; longer lines are skipped). */
static int each_line(const char *data, size_t len, int (*fn)(char *line, void *ctx), void *ctx) {
    char line[4096];
    size_t i = 0;
    while (i < len) {
        const char *nl = memchr(data + i, '\n', len - i);
        size_t ll = nl ? (size_t)(nl - (data + i)) : len - i;
        if (ll < sizeof line) {
            memcpy(line, data + i, ll);
            line[ll] = 0;
            if (fn(line, ctx)) return 1;
        }
        i += ll + 1;
    }
    return 0;
}

struct pw_search {
    const char *name;
    int by_uid;
    unsigned long uid;
    struct ident *id;
};

static int pw_line(char *line, void *ctx) {
    struct pw_search *s = ctx;
    char *f[7];
    int n = split_colon(line, f, 7);
    unsigned long uid, gid;
    if (n < 4 || !*f[0] || !parse_id(f[2], &uid) || !parse_id(f[3], &gid)) return 0;
    if (s->by_uid ? uid != s->uid : strcmp(f[0], s->name) != 0) return 0;
    if (strlen(f[0]) >= sizeof s->id->name) return 0;
    strcpy(s->id->name, f[0]);
    s->id->uid = (uid_t)uid;
    s->id->gid = (gid_t)gid;
    if (n >= 6 && f[5][0] == '/' && strlen(f[5]) < sizeof s->id->home) strcpy(s->id->home, f[5]);
    else strcpy(s->id->home, "/");
    return 1;
}

static int gr_line(char *line, void *ctx) {
    struct ident *id = ctx;
    char *f[4];
    unsigned long gid;
    if (split_colon(line, f, 4) < 4 || !parse_id(f[2], &gid)) return 0;
    for (char *m = strtok(f[3], ","); m; m = strtok(NULL, ",")) {
        if (strcmp(m, id->name) != 0) continue;
        for (int i = 0; i < id->ngroups; i++)
            if (id->groups[i] == (gid_t)gid) return 0;
        if (id->ngroups < MAX_GROUPS) id->groups[id->ngroups++] = (gid_t)gid;
        return 0;
    }
    return 0;
}

/* spec: NULL/"" (root), a name, or a numeric uid. 0 on success, else err holds a message. */
static int resolve_user(const char *spec, struct ident *id, char *err, size_t errlen) {
    memset(id, 0, sizeof *id);
    struct pw_search s = {.name = spec, .id = id};
    if (!spec || !*spec) {
        s.by_uid = 1;
        s.uid = 0;
    } else if (parse_id(spec, &s.uid)) {
        s.by_uid = 1;
    } else if (strlen(spec) >= sizeof id->name || strchr(spec, ':') || strchr(spec, '\n')) {
        snprintf(err, errlen, "unknown user: %.200s", spec);
        return -1;
    }
    size_t len;
    char *pw = load_id_file("/etc/passwd", &len);
    int found = pw && each_line(pw, len, pw_line, &s);
    free(pw);
    if (!found) {
        if (!s.by_uid) {
            snprintf(err, errlen, "unknown user: %.200s", spec);
            return -1;
        }
        /* A bare uid without a passwd entry: primary group = uid, like most runtimes do. */
        id->uid = (uid_t)s.uid;
        id->gid = (gid_t)s.uid;
        if (s.uid == 0) {
            strcpy(id->name, "root");
            strcpy(id->home, "/root");
        } else {
            snprintf(id->name, sizeof id->name, "%lu", s.uid);
            strcpy(id->home, "/");
        }
    }
    id->groups[id->ngroups++] = id->gid;
    char *gr = load_id_file("/etc/group", &len);
    if (gr) each_line(gr, len, gr_line, id);
    free(gr);
    return 0;
}

/* ------------------------------------------------------------------ event loop state */

struct conn;
struct proc;

enum { EV_LISTEN, EV_SIGNAL, EV_CONN, EV_OUT, EV_IN };

struct evsrc {
    int type;
    int idx;
    uint32_t events;  /* currently registered, 0 = not registered */
    void *obj;
};

enum { C_REQ, C_ATTACHED, C_STDIN, C_DONE };

struct conn {
    struct evsrc ev;
    int fd;
    int state;
    int dead;
    uint8_t *in;            /* the request frame being read */
    size_t in_len;
    uint32_t want;          /* payload length once the header is in */
    struct buf out;
    size_t out_off;
    /* attached to a process's output or exit */
    struct proc *proc;
    struct conn *sub_next;
    uint64_t cursor[2];
    int output;
    int owner;              /* spawned with attach: its disconnect kills the process group */
    /* queued stdin write */
    struct proc *q_proc;
    struct conn *q_next;
    uint8_t *q_data;
    size_t q_len, q_off;
    int q_close;
    struct conn *grave_next;
};

struct stream {
    struct evsrc ev;
    int fd;
    int paused;
    size_t drain_left;
    uint8_t *buf;
    size_t cap;
    uint64_t start, total;  /* the ring holds bytes [start, total) of everything read */
};

struct proc {
    struct proc *prev, *next;
    pid_t pid;
    char **argv;
    int argc;
    char *cwd, *user, *tag;
    int pty;
    int reaped, finished, draining, kick;
    int exit_code;
    int64_t started_ns, deadline_ms;
    uint64_t finish_seq;
    struct stream out[2];
    struct evsrc in_ev;
    int in_fd;
    struct conn *q_head;
    struct conn *subs;
};

static int g_ep = -1;
static struct rlimit g_nofile;  /* as we were started: what sandbox processes get */
static int g_listen = -1;
static int g_sigfd = -1;
static struct evsrc g_listen_ev = {.type = EV_LISTEN};
static struct evsrc g_sig_ev = {.type = EV_SIGNAL};
static int64_t g_listen_retry_ms;
static char **g_env;
static struct proc *g_procs, *g_procs_tail;
static int g_nprocs, g_nfinished, g_nconns, g_gc, g_kick;
static uint64_t g_finish_seq;
static struct conn *g_grave;

static void ep_watch(int fd, struct evsrc *ev, uint32_t events) {
    if (ev->events == events) return;
    struct epoll_event e = {.events = events, .data.ptr = ev};
    int op = !ev->events ? EPOLL_CTL_ADD : events ? EPOLL_CTL_MOD : EPOLL_CTL_DEL;
    if (epoll_ctl(g_ep, op, fd, &e) == 0 || op == EPOLL_CTL_DEL) ev->events = events;
}

/* Always deregister before close: a forked child may still hold the same open file, which
 * would keep a stale registration (and our freed pointer) alive in the epoll set. */
static void ep_close(int fd, struct evsrc *ev) {
    if (fd < 0) return;
    ep_watch(fd, ev, 0);
    close(fd);
}

static void pump(struct conn *c);
static void conn_flush(struct conn *c);
static void stream_read(struct proc *p, int s);

/* ------------------------------------------------------------------ connections */

static void conn_close(struct conn *c) {
    if (c->dead) return;
    c->dead = 1;
    if (c->proc) {
        struct proc *p = c->proc;
        struct conn **pp = &p->subs;
        while (*pp && *pp != c) pp = &(*pp)->sub_next;
        if (*pp) *pp = c->sub_next;
        if (c->owner && !p->finished) kill(-p->pid, SIGKILL);
        c->proc = NULL;
        /* A lagging reader leaving may let the process's pipes flow again. */
        for (int s = 0; s < 2; s++)
            if (p->out[s].paused) {
                p->out[s].paused = 0;
                ep_watch(p->out[s].fd, &p->out[s].ev, EPOLLIN);
                p->kick = g_kick = 1;
            }
        g_gc = 1;
    }
    if (c->q_proc) {
        struct conn **pp = &c->q_proc->q_head;
        while (*pp && *pp != c) pp = &(*pp)->q_next;
        if (*pp) *pp = c->q_next;
        c->q_proc = NULL;
    }
    ep_close(c->fd, &c->ev);
    c->fd = -1;
    free(c->in);
    free(c->out.d);
    free(c->q_data);
    c->in = c->out.d = c->q_data = NULL;
    c->grave_next = g_grave;
    g_grave = c;
    g_nconns--;
    if (g_listen_retry_ms) {
        g_listen_retry_ms = 0;
        ep_watch(g_listen, &g_listen_ev, EPOLLIN);
    }
}

static void conn_flush(struct conn *c) {
    while (c->out_off < c->out.len) {
        ssize_t n = send(c->fd, c->out.d + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        conn_close(c);
        return;
    }
    if (c->out_off == c->out.len) {
        c->out.len = c->out_off = 0;
        if (c->state == C_DONE) {
            conn_close(c);
            return;
        }
    } else if (c->out_off >= OUT_HIGH) {
        memmove(c->out.d, c->out.d + c->out_off, c->out.len - c->out_off);
        c->out.len -= c->out_off;
        c->out_off = 0;
    }
    ep_watch(c->fd, &c->ev, EPOLLIN | EPOLLRDHUP | (c->out.len ? EPOLLOUT : 0));
}

static void conn_error(struct conn *c, const char *code, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    frame_error(&c->out, code, msg);
    c->state = C_DONE;
    conn_flush(c);
}

static void conn_ok_pid(struct conn *c, pid_t pid, int done) {
    size_t at = frame_begin(&c->out, T_OK);
    if (pid) field_int(&c->out, F_PID, pid);
    frame_end(&c->out, at);
    if (done) c->state = C_DONE;
    conn_flush(c);
}

/* ------------------------------------------------------------------ processes */

static struct proc *proc_find(int64_t pid) {
    for (struct proc *p = g_procs_tail; p; p = p->prev)
        if (p->pid == pid) return p;
    return NULL;
}

static uint64_t stream_floor(struct proc *p, int s) {
    uint64_t m = p->out[s].total;
    for (struct conn *c = p->subs; c; c = c->sub_next)
        if (c->output && c->cursor[s] < m) m = c->cursor[s];
    return m;
}

static void ring_grow(struct stream *st) {
    size_t nc = st->cap ? st->cap * 2 : RING_MIN;
    if (nc > RING_MAX) nc = RING_MAX;
    uint8_t *nb = xrealloc(NULL, nc);
    for (uint64_t o = st->start; o < st->total;) {
        size_t from = (size_t)(o % st->cap), to = (size_t)(o % nc);
        size_t n = (size_t)(st->total - o);
        if (n > st->cap - from) n = st->cap - from;
        if (n > nc - to) n = nc - to;
        memcpy(nb + to, st->buf + from, n);
        o += n;
    }
    free(st->buf);
    st->buf = nb;
    st->cap = nc;
}

static void proc_unpause(struct proc *p) {
    for (int s = 0; s < 2; s++) {
        struct stream *st = &p->out[s];
        if (!st->paused || st->total - stream_floor(p, s) >= st->cap) continue;
        st->paused = 0;
        ep_watch(st->fd, &st->ev, EPOLLIN);
        if (p->draining) p->kick = g_kick = 1;
    }
}

static void proc_finish(struct proc *p) {
    p->finished = 1;
    p->finish_seq = ++g_finish_seq;
    g_nfinished++;
    g_gc = 1;
    ep_close(p->in_fd, &p->in_ev);
    p->in_fd = -1;
    while (p->q_head) {
        struct conn *c = p->q_head;
        p->q_head = c->q_next;
        c->q_proc = NULL;
        conn_error(c, "conflict", "process %d has exited", (int)p->pid);
    }
    for (struct conn *c = p->subs, *next; c; c = next) {
        next = c->sub_next;
        pump(c);
    }
}

static void stream_close(struct proc *p, int s) {
    struct stream *st = &p->out[s];
    if (st->fd < 0) return;
    ep_close(st->fd, &st->ev);
    st->fd = -1;
    st->paused = 0;
    if (p->reaped && p->out[0].fd < 0 && p->out[1].fd < 0 && !p->finished) proc_finish(p);
}

static void stream_read(struct proc *p, int s) {
    struct stream *st = &p->out[s];
    /* Bounded rounds keep one chatty process from starving the loop (epoll is level triggered). */
    for (int round = 0; st->fd >= 0 && round < 16; round++) {
        if (st->total - st->start == st->cap && st->cap < RING_MAX) ring_grow(st);
        size_t owed = (size_t)(st->total - stream_floor(p, s));
        if (owed >= st->cap) {
            /* Someone has not received what the ring holds: stop reading, never drop it. */
            st->paused = 1;
            ep_watch(st->fd, &st->ev, 0);
            return;
        }
        size_t pos = (size_t)(st->total % st->cap);
        size_t n = st->cap - pos;
        if (n > st->cap - owed) n = st->cap - owed;
        if (n > OUT_CHUNK) n = OUT_CHUNK;
        ssize_t r = read(st->fd, st->buf + pos, n);
        if (r > 0) {
            st->total += (uint64_t)r;
            if (st->total - st->start > st->cap) st->start = st->total - st->cap;
            for (struct conn *c = p->subs, *next; c; c = next) {
                next = c->sub_next;
                if (c->output) pump(c);
            }
            if (p->draining) {
                /* A descendant that keeps writing must not hold back the exit event (nor keep
                 * the loop busy): once the budget is spent the pipe is closed. */
                st->drain_left = (size_t)r >= st->drain_left ? 0 : st->drain_left - (size_t)r;
                if (!st->drain_left) {
                    stream_close(p, s);
                    return;
                }
            }
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) {
            /* After the grace period an open pipe only means a descendant still holds it. */
            if (p->draining) stream_close(p, s);
            return;
        }
        stream_close(p, s);  /* EOF, or EIO from a PTY whose slave side is gone */
        return;
    }
}

static void proc_free(struct proc *p) {
    if (p->prev) p->prev->next = p->next; else g_procs = p->next;
    if (p->next) p->next->prev = p->prev; else g_procs_tail = p->prev;
    for (int s = 0; s < 2; s++) {
        ep_close(p->out[s].fd, &p->out[s].ev);
        free(p->out[s].buf);
    }
    ep_close(p->in_fd, &p->in_ev);
    for (int i = 0; i < p->argc; i++) free(p->argv[i]);
    free(p->argv);
    free(p->cwd);
    free(p->user);
    free(p->tag);
    free(p);
    g_nprocs--;
}

static void gc_procs(void) {
    g_gc = 0;
    while (g_nfinished > KEEP_EXITED) {
        struct proc *victim = NULL;
        for (struct proc *p = g_procs; p; p = p->next)
            if (p->finished && !p->subs && (!victim || p->finish_seq < victim->finish_seq)) victim = p;
        if (!victim) return;
        proc_free(victim);
        g_nfinished--;
    }
}

static void on_sigchld(void) {
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid <= 0) return;
        struct proc *p = NULL;
        for (struct proc *q = g_procs_tail; q; q = q->prev)
            if (q->pid == pid && !q->reaped) { p = q; break; }
        if (!p) continue;  /* an orphan or a file helper: reaping is all it needs */
        p->reaped = 1;
        p->exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 255;
        if (p->out[0].fd < 0 && p->out[1].fd < 0) {
            proc_finish(p);
            continue;
        }
        p->deadline_ms = mono_ms() + DRAIN_GRACE_MS;
        for (int s = 0; s < 2; s++)
            if (p->out[s].fd >= 0 && !p->out[s].paused) stream_read(p, s);
    }
}

static void stdin_pump(struct proc *p) {
    while (p->q_head) {
        struct conn *c = p->q_head;
        int fail = 0;
        if (c->q_close && !p->pty) {
            ep_close(p->in_fd, &p->in_ev);
            p->in_fd = -1;
        } else if (p->in_fd < 0) {
            fail = EPIPE;
        } else {
            while (c->q_off < c->q_len) {
                ssize_t n = write(p->in_fd, c->q_data + c->q_off, c->q_len - c->q_off);
                if (n > 0) { c->q_off += (size_t)n; continue; }
                if (n < 0 && errno == EINTR) continue;
                if (n < 0 && errno == EAGAIN) {
                    ep_watch(p->in_fd, &p->in_ev, EPOLLOUT);
                    return;
                }
                fail = n < 0 ? errno : EIO;
                break;
            }
        }
        p->q_head = c->q_next;
        c->q_proc = NULL;
        if (fail) conn_error(c, "conflict", "stdin of process %d is closed", (int)p->pid);
        else conn_ok_pid(c, 0, 1);
    }
    if (p->in_fd >= 0) ep_watch(p->in_fd, &p->in_ev, 0);
}

/* Fills the connection's send buffer from the process's rings and sends; ends with the exit
 * event. Loops while the socket takes everything, so it never waits for an EPOLLOUT that would
 * not come because the buffer was already empty. */
static void pump(struct conn *c) {
    struct proc *p = c->proc;
    if (!p || c->dead) return;
    for (;;) {
        int moved = 0;
        while (c->output && c->out.len - c->out_off < OUT_HIGH) {
            int any = 0;
            for (int s = 0; s < 2; s++) {
                struct stream *st = &p->out[s];
                if (c->cursor[s] < st->start) c->cursor[s] = st->start;
                if (c->cursor[s] >= st->total) continue;
                size_t n = (size_t)(st->total - c->cursor[s]);
                size_t pos = (size_t)(c->cursor[s] % st->cap);
                if (n > OUT_CHUNK) n = OUT_CHUNK;
                if (n > st->cap - pos) n = st->cap - pos;
                size_t at = frame_begin(&c->out, s ? T_STDERR : T_STDOUT);
                buf_put(&c->out, st->buf + pos, n);
                frame_end(&c->out, at);
                c->cursor[s] += n;
                any = moved = 1;
            }
            if (!any) break;
        }
        int caught_up = !c->output ||
                        (c->cursor[0] >= p->out[0].total && c->cursor[1] >= p->out[1].total);
        if (p->finished && caught_up) {
            size_t at = frame_begin(&c->out, T_EXIT);
            field_int(&c->out, F_EXIT, p->exit_code);
            frame_end(&c->out, at);
            struct conn **pp = &p->subs;
            while (*pp && *pp != c) pp = &(*pp)->sub_next;
            if (*pp) *pp = c->sub_next;
            c->proc = NULL;
            c->state = C_DONE;
            g_gc = 1;
        }
        if (moved) proc_unpause(p);
        conn_flush(c);
        /* Go again only if the socket took it all and there is more to send. */
        if (c->dead || !c->proc || c->out.len || caught_up) return;
    }
}

static void subscribe(struct conn *c, struct proc *p, int output, int replay, int owner) {
    c->proc = p;
    c->output = output;
    c->owner = owner;
    c->state = C_ATTACHED;
    for (int s = 0; s < 2; s++) c->cursor[s] = replay ? p->out[s].start : p->out[s].total;
    c->sub_next = p->subs;
    p->subs = c;
    pump(c);
}

/* ------------------------------------------------------------------ spawn */

struct spawn_req {
    char **argv;
    int argc;
    char **env;
    int envc;
    char *cwd, *user, *tag;
    int64_t rows, cols;
    int pty, stdin_open, attach;
};

static void spawn_req_free(struct spawn_req *r) {
    for (int i = 0; i < r->argc; i++) free(r->argv[i]);
    for (int i = 0; i < r->envc; i++) free(r->env[i]);
    free(r->argv);
    free(r->env);
    free(r->cwd);
    free(r->user);
    free(r->tag);
}

static const char *spawn_req_parse(const struct fields *f, struct spawn_req *r) {
    int bad = 0;
    memset(r, 0, sizeof *r);
    int argc = field_count(f, F_ARG), envc = field_count(f, F_ENV);
    r->argv = xrealloc(NULL, sizeof(char *) * ((size_t)argc + 1));
    r->env = xrealloc(NULL, sizeof(char *) * ((size_t)envc + 1));
    for (int i = 0; i < argc; i++) {
        char *a = field_strdup(f, F_ARG, i, &bad);
        if (!a) break;
        r->argv[r->argc++] = a;
    }
    r->argv[r->argc] = NULL;
    for (int i = 0; i < envc; i++) {
        char *e = field_strdup(f, F_ENV, i, &bad);
        if (!e) break;
        r->env[r->envc++] = e;
        char *eq = strchr(e, '=');
        if (!eq || eq == e) bad = 1;
    }
    r->env[r->envc] = NULL;
    r->cwd = field_strdup(f, F_CWD, 0, &bad);
    r->user = field_strdup(f, F_USER, 0, &bad);
    r->tag = field_strdup(f, F_TAG, 0, &bad);
    r->rows = field_i64_or(f, F_ROWS, 0, &bad);
    r->cols = field_i64_or(f, F_COLS, 0, &bad);
    r->stdin_open = field_i64_or(f, F_STDIN, 1, &bad) != 0;
    r->attach = field_i64_or(f, F_ATTACH, 0, &bad) != 0;
    r->pty = r->rows > 0 || r->cols > 0;
    if (bad) return "malformed spawn request";
    if (r->argc < 1 || !r->argv[0][0]) return "argv must not be empty";
    if (r->cwd && r->cwd[0] != '/') return "cwd must be an absolute path";
    if (r->cwd && strlen(r->cwd) >= PATH_MAX) return "cwd is too long";
    if (r->tag && strlen(r->tag) > MAX_TAG) return "tag is too long";
    if (r->pty && (r->rows < 1 || r->rows > 65535 || r->cols < 1 || r->cols > 65535))
        return "pty rows and cols must be within 1..65535";
    return NULL;
}

/* Replaces or appends "KEY=VALUE" in a NULL-terminated vector it owns. */
static void env_set(char ***env, int *n, const char *kv) {
    size_t kl = (size_t)(strchr(kv, '=') - kv);
    for (int i = 0; i < *n; i++) {
        if (strncmp((*env)[i], kv, kl) == 0 && (*env)[i][kl] == '=') {
            free((*env)[i]);
            (*env)[i] = xstrndup(kv, strlen(kv));
            return;
        }
    }
    *env = xrealloc(*env, sizeof(char *) * ((size_t)*n + 2));
    (*env)[(*n)++] = xstrndup(kv, strlen(kv));
    (*env)[*n] = NULL;
}

static const char *env_get(char **env, const char *key) {
    size_t kl = strlen(key);
    for (; env && *env; env++)
        if (strncmp(*env, key, kl) == 0 && (*env)[kl] == '=') return *env + kl + 1;
    return NULL;
}

static void env_set2(char ***env, int *n, const char *k, const char *v) {
    size_t len = strlen(k) + strlen(v) + 2;
    char *kv = xrealloc(NULL, len);
    snprintf(kv, len, "%s=%s", k, v);
    env_set(env, n, kv);
    free(kv);
}

enum { STAGE_STDIO = 1, STAGE_TTY, STAGE_USER, STAGE_CWD, STAGE_EXEC };

struct child_err {
    int stage, err;
};

static void exec_search(char **argv, char **envp) {
    const char *file = argv[0];
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return;
    }
    const char *path = env_get(envp, "PATH");
    if (!path) path = DEFAULT_PATH;
    int eacces = 0;
    char buf[PATH_MAX];
    for (const char *seg = path;;) {
        const char *end = strchrnul(seg, ':');
        int dl = (int)(end - seg);
        if (snprintf(buf, sizeof buf, "%.*s/%s", dl ? dl : 1, dl ? seg : ".", file) < (int)sizeof buf) {
            execve(buf, argv, envp);
            if (errno == EACCES) eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ESTALE && errno != ENODEV &&
                     errno != ETIMEDOUT && errno != ENAMETOOLONG && errno != ELOOP)
                return;
        }
        if (!*end) break;
        seg = end + 1;
    }
    errno = eacces ? EACCES : ENOENT;
}

static void fd_to(int from, int to) {
    if (from == to) fcntl(to, F_SETFD, 0);
    else dup2(from, to);
}

static __attribute__((noreturn)) void child_fail(int errfd, int stage) {
    struct child_err ce = {stage, errno};
    if (write(errfd, &ce, sizeof ce) < 0) { /* the parent will report a generic failure */ }
    _exit(127);
}

static __attribute__((noreturn)) void child_exec(struct spawn_req *r, struct ident *id,
                                                 char **envp, int fd_in, int fd_out, int fd_err,
                                                 int slave, int errfd) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setrlimit(RLIMIT_NOFILE, &g_nofile);
    setsid();
    /* Make every process we start a likelier OOM victim than the agent itself: if the agent (pid
     * 1) were chosen, the whole sandbox would die. Raising needs no privilege; a process may only
     * lower its own value back to 0, never below the agent's. Best effort. */
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom >= 0) {
        (void)!write(oom, "500", 3);
        close(oom);
    }
    if (slave >= 0) {
        if (ioctl(slave, TIOCSCTTY, 0) < 0) child_fail(errfd, STAGE_TTY);
        fd_in = fd_out = fd_err = slave;
    }
    /* Move the ends above 2 first so that dup2 into 0..2 cannot clobber one another. */
    int a = fcntl(fd_in, F_DUPFD_CLOEXEC, 3), b = fcntl(fd_out, F_DUPFD_CLOEXEC, 3),
        c = fcntl(fd_err, F_DUPFD_CLOEXEC, 3);
    if (a < 0 || b < 0 || c < 0) child_fail(errfd, STAGE_STDIO);
    fd_to(a, 0);
    fd_to(b, 1);
    fd_to(c, 2);
    if (getuid() == 0 || id->uid != geteuid()) {
        /* Raw syscalls: libc's wrappers may try to synchronise other threads, which is not
         * something to do from a vfork child. */
        if (syscall(SYS_setgroups, (size_t)id->ngroups, id->groups) < 0 ||
            syscall(SYS_setgid, id->gid) < 0 || syscall(SYS_setuid, id->uid) < 0)
            child_fail(errfd, STAGE_USER);
    }
    if (r->cwd) {
        if (chdir(r->cwd) < 0) child_fail(errfd, STAGE_CWD);
    } else if (chdir(id->home) < 0 && chdir("/") < 0) {
        child_fail(errfd, STAGE_CWD);
    }
    exec_search(r->argv, envp);
    child_fail(errfd, STAGE_EXEC);
}

static int open_pty(int64_t rows, int64_t cols, int *master, int *slave) {
    *master = *slave = -1;
    int m = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    if (m < 0) return -1;
    int unlock = 0;
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0 || ioctl(m, TIOCSWINSZ, &ws) < 0) goto fail;
    /* TIOCGPTPEER opens the peer without a path lookup in a /dev/pts the sandbox may control. */
    int s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (s < 0) goto fail;
    *master = m;
    *slave = s;
    return 0;
fail:;
    int e = errno;
    close(m);
    errno = e;
    return -1;
}

static void close_all(int *fds, int n) {
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0) close(fds[i]);
}

/* Starts the process; on failure writes a message into err and returns NULL. */
static struct proc *do_spawn(struct spawn_req *r, const char **code, char *err, size_t errlen) {
    *code = "invalid";
    if (g_nprocs >= MAX_PROCS) {
        *code = "conflict";
        snprintf(err, errlen, "too many processes (%d)", MAX_PROCS);
        return NULL;
    }
    struct ident id;
    if (resolve_user(r->user, &id, err, errlen) < 0) return NULL;

    char **envp = NULL;
    int envc = 0;
    envp = xrealloc(NULL, sizeof(char *));
    envp[0] = NULL;
    for (char **e = g_env; *e; e++)
        if (strchr(*e, '=') && **e != '=') env_set(&envp, &envc, *e);
    env_set2(&envp, &envc, "HOME", id.home);
    env_set2(&envp, &envc, "USER", id.name);
    env_set2(&envp, &envc, "LOGNAME", id.name);
    if (!env_get(envp, "PATH")) env_set2(&envp, &envc, "PATH", DEFAULT_PATH);
    if (r->pty && !env_get(envp, "TERM")) env_set2(&envp, &envc, "TERM", "xterm");
    for (int i = 0; i < r->envc; i++) env_set(&envp, &envc, r->env[i]);

    /* fds: 0 in_r 1 in_w 2 out_r 3 out_w 4 err_r 5 err_w 6 master 7 slave 8 errp_r 9 errp_w */
    int fds[10];
    for (int i = 0; i < 10; i++) fds[i] = -1;
    struct proc *p = NULL;
    if (r->pty) {
        if (open_pty(r->rows, r->cols, &fds[6], &fds[7]) < 0) {
            *code = "io";
            snprintf(err, errlen, "cannot open a pty: %s", strerror(errno));
            goto out;
        }
    } else if (pipe2(fds, O_CLOEXEC) < 0 || pipe2(fds + 2, O_CLOEXEC) < 0 ||
               pipe2(fds + 4, O_CLOEXEC) < 0) {
        *code = "io";
        snprintf(err, errlen, "cannot create pipes: %s", strerror(errno));
        goto out;
    }
    if (pipe2(fds + 8, O_CLOEXEC) < 0) {
        *code = "io";
        snprintf(err, errlen, "cannot create a pipe: %s", strerror(errno));
        goto out;
    }
    /* vfork: the child borrows our memory until execve, so the cost does not grow with the
     * rings and tables we hold. child_exec only makes syscalls and writes its own frame. */
    pid_t pid = vfork();
    if (pid < 0) {
        *code = "io";
        snprintf(err, errlen, "fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) child_exec(r, &id, envp, fds[0], fds[3], fds[5], fds[7], fds[9]);

    close(fds[9]);
    fds[9] = -1;
    struct child_err ce;
    ssize_t n;
    do n = read(fds[8], &ce, sizeof ce); while (n < 0 && errno == EINTR);
    if (n != 0) {
        /* The child reported a failure (or the pipe broke): it exits at once; reap it here. */
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
        if (n != (ssize_t)sizeof ce) {
            *code = "io";
            snprintf(err, errlen, "exec failed for an unknown reason");
        } else if (ce.stage == STAGE_EXEC && ce.err == ENOENT) {
            snprintf(err, errlen, "command not found: %.256s", r->argv[0]);
        } else if (ce.stage == STAGE_EXEC && ce.err == EACCES) {
            snprintf(err, errlen, "permission denied: %.256s", r->argv[0]);
        } else if (ce.stage == STAGE_EXEC) {
            snprintf(err, errlen, "cannot execute %.256s: %s", r->argv[0], strerror(ce.err));
        } else if (ce.stage == STAGE_CWD) {
            snprintf(err, errlen, "cannot change directory to %.256s: %s",
                     r->cwd ? r->cwd : id.home, strerror(ce.err));
        } else {
            *code = "io";
            snprintf(err, errlen, "cannot %s: %s",
                     ce.stage == STAGE_USER ? "switch user" :
                     ce.stage == STAGE_TTY ? "set the controlling terminal" : "set up stdio",
                     strerror(ce.err));
        }
        goto out;
    }

    p = xrealloc(NULL, sizeof *p);
    memset(p, 0, sizeof *p);
    p->pid = pid;
    p->argc = r->argc;
    p->argv = r->argv;
    r->argv = NULL;
    r->argc = 0;
    p->cwd = xstrndup(r->cwd ? r->cwd : id.home, strlen(r->cwd ? r->cwd : id.home));
    if (!r->cwd) {
        struct stat st;
        if (stat(p->cwd, &st) < 0 || !S_ISDIR(st.st_mode)) strcpy(p->cwd, "/");
    }
    p->user = xstrndup(id.name, strlen(id.name));
    p->tag = r->tag;
    r->tag = NULL;
    p->pty = r->pty;
    p->started_ns = wall_ns();
    p->in_ev = (struct evsrc){.type = EV_IN, .obj = p};
    for (int s = 0; s < 2; s++) p->out[s].ev = (struct evsrc){.type = EV_OUT, .obj = p, .idx = s};
    if (r->pty) {
        p->out[0].fd = fds[6];
        p->out[1].fd = -1;
        p->in_fd = fcntl(fds[6], F_DUPFD_CLOEXEC, 3);
        fds[6] = -1;
    } else {
        p->out[0].fd = fds[2];
        p->out[1].fd = fds[4];
        p->in_fd = fds[1];
        fds[1] = fds[2] = fds[4] = -1;
        set_cloexec_nonblock(p->out[0].fd, 1);
        set_cloexec_nonblock(p->out[1].fd, 1);
        if (r->stdin_open) {
            set_cloexec_nonblock(p->in_fd, 1);
        } else {
            close(p->in_fd);
            p->in_fd = -1;
        }
    }
    if (p->in_fd >= 0) set_cloexec_nonblock(p->in_fd, 1);
    p->prev = g_procs_tail;
    if (g_procs_tail) g_procs_tail->next = p; else g_procs = p;
    g_procs_tail = p;
    g_nprocs++;
    for (int s = 0; s < 2; s++)
        if (p->out[s].fd >= 0) ep_watch(p->out[s].fd, &p->out[s].ev, EPOLLIN);
out:
    close_all(fds, 10);
    for (int i = 0; i < envc; i++) free(envp[i]);
    free(envp);
    return p;
}

/* ------------------------------------------------------------------ file operations (helper) */

/* The helper owns the connection and does blocking I/O on it; it never returns. */

static int h_fd;
static struct buf h_out;

static int h_send_all(const void *p, size_t n) {
    const uint8_t *d = p;
    while (n) {
        ssize_t w = send(h_fd, d, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        d += w;
        n -= (size_t)w;
    }
    return 0;
}

static void h_flush(void) {
    if (h_send_all(h_out.d, h_out.len) < 0) _exit(1);
    h_out.len = 0;
}

static __attribute__((noreturn)) void h_fail(const char *code, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    frame_error(&h_out, code, msg);
    h_flush();
    _exit(0);
}

static const char *errno_code(int e) {
    switch (e) {
    case ENOENT: return "not_found";
    case ENOTDIR: return "not_a_directory";
    case EISDIR: return "is_a_directory";
    case EEXIST: return "exists";
    case ENOTEMPTY: return "not_empty";
    case EACCES: case EPERM: case EROFS: case ETXTBSY: return "permission_denied";
    case ENOSPC: case EDQUOT: return "no_space";
    case EXDEV: case ELOOP: case EINVAL: case ENAMETOOLONG: case EBUSY: return "invalid";
    default: return "io";
    }
}

static __attribute__((noreturn)) void h_fail_errno(int e, const char *what, const char *path) {
    h_fail(errno_code(e), "%s %.1024s: %s", what, path, strerror(e));
}

static int h_read_full(void *p, size_t n) {
    uint8_t *d = p;
    while (n) {
        ssize_t r = read(h_fd, d, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        d += r;
        n -= (size_t)r;
    }
    return 0;
}

struct target {
    int root;
    uint64_t resolve;
    const char *beneath;
    char path[PATH_MAX];  /* as asked, trailing slashes removed: what we report */
    char rel[PATH_MAX];   /* normalized path relative to root ("." for root itself) */
};

static long h_openat2(int dirfd, const char *path, int flags, mode_t mode, uint64_t resolve) {
    struct open_how_ how = {.flags = (uint64_t)flags, .mode = mode, .resolve = resolve};
    for (int i = 0; i < 16; i++) {
        long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        if (fd >= 0 || errno != EAGAIN) {
            if (fd < 0 && errno == ENOSYS && !(resolve & RESOLVE_BENEATH))
                return openat(dirfd, path, flags, mode);
            return fd;
        }
    }
    return -1;
}

static void strip_trailing(char *p) {
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/') p[--n] = 0;
}

static void target_init(struct target *t, const char *path, const char *beneath) {
    memset(t, 0, sizeof *t);
    if (!path || path[0] != '/') h_fail("invalid", "path must be absolute: %.1024s", path ? path : "");
    if (strlen(path) >= PATH_MAX) h_fail("invalid", "path is too long");
    strcpy(t->path, path);
    strip_trailing(t->path);
    const char *rest = t->path;
    if (beneath) {
        static char b[PATH_MAX];
        if (beneath[0] != '/' || strlen(beneath) >= PATH_MAX)
            h_fail("invalid", "beneath must be an absolute path");
        strcpy(b, beneath);
        strip_trailing(b);
        size_t bl = strcmp(b, "/") == 0 ? 0 : strlen(b);
        if (strncmp(t->path, b, bl) != 0 || (t->path[bl] != '/' && t->path[bl] != 0))
            h_fail("invalid", "path %.1024s is not beneath %.1024s", t->path, b);
        rest = t->path + bl;
        t->beneath = b;
        t->root = open(b, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (t->root < 0) h_fail_errno(errno, "cannot open", b);
        t->resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    } else {
        t->root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (t->root < 0) h_fail_errno(errno, "cannot open", "/");
        t->resolve = RESOLVE_NO_MAGICLINKS;
    }
    /* Lexical clean-up only drops empty and "." parts; ".." is left to openat2 to judge. */
    char *o = t->rel;
    for (const char *s = rest; *s;) {
        while (*s == '/') s++;
        const char *e = strchrnul(s, '/');
        size_t n = (size_t)(e - s);
        if (n && !(n == 1 && s[0] == '.')) {
            if (o != t->rel) *o++ = '/';
            memcpy(o, s, n);
            o += n;
        }
        s = e;
    }
    *o = 0;
    if (!t->rel[0]) strcpy(t->rel, ".");
}

static void h_resolve_fail(struct target *t, int e, const char *what) {
    if (e == EXDEV && t->beneath)
        h_fail("invalid", "%.1024s leaves %.1024s", t->path, t->beneath);
    if (e == ELOOP)
        h_fail("invalid", "%s %.1024s: a symbolic link is in the way", what, t->path);
    h_fail_errno(e, what, t->path);
}

/* Opens `rel` (relative to root) as an O_PATH directory; -1 with errno on failure. */
static int open_dir_path(struct target *t, const char *rel) {
    return (int)h_openat2(t->root, rel, O_PATH | O_DIRECTORY | O_CLOEXEC, 0, t->resolve);
}

/* mkdir -p of `rel`, new directories owned by uid:gid; returns an O_PATH fd of the last one. */
static int mkdir_p(struct target *t, const char *rel, uid_t uid, gid_t gid) {
    char prefix[PATH_MAX];
    int cur = open_dir_path(t, ".");
    if (cur < 0) return -1;
    if (strcmp(rel, ".") == 0) return cur;
    size_t len = strlen(rel);
    for (size_t i = 0; i <= len; i++) {
        if (rel[i] != '/' && rel[i] != 0) continue;
        memcpy(prefix, rel, i);
        prefix[i] = 0;
        const char *comp = strrchr(prefix, '/');
        comp = comp ? comp + 1 : prefix;
        int fd = open_dir_path(t, prefix);
        if (fd < 0 && errno == ENOENT) {
            if (mkdirat(cur, comp, 0755) == 0) {
                if (fchownat(cur, comp, uid, gid, AT_SYMLINK_NOFOLLOW) < 0) {
                    int e = errno;
                    close(cur);
                    errno = e;
                    return -1;
                }
            } else if (errno != EEXIST) {
                int e = errno;
                close(cur);
                errno = e;
                return -1;
            }
            fd = open_dir_path(t, prefix);
        }
        int e = errno;
        close(cur);
        if (fd < 0) {
            errno = e;
            return -1;
        }
        cur = fd;
    }
    return cur;
}

/* Resolves the parent of the target; name receives the last component ("." for the root). */
static int open_parent(struct target *t, char *name, int create, uid_t uid, gid_t gid) {
    char parent[PATH_MAX];
    const char *slash = strrchr(t->rel, '/');
    if (slash) {
        memcpy(parent, t->rel, (size_t)(slash - t->rel));
        parent[slash - t->rel] = 0;
        strcpy(name, slash + 1);
    } else {
        strcpy(parent, ".");
        strcpy(name, t->rel);
    }
    if (strcmp(name, "..") == 0) h_fail("invalid", "path must not end in ..: %.1024s", t->path);
    int fd = create ? mkdir_p(t, parent, uid, gid) : open_dir_path(t, parent);
    if (fd < 0) h_resolve_fail(t, errno, "cannot resolve");
    return fd;
}

/* Appends the file's user.e2b.* xattrs as XATTR fields ("key\0value", prefix dropped): those of
 * `name` in the current directory (a single component, never followed: llistxattr), or with
 * name NULL those of the open file xfd. At most MAX_XATTRS and XATTR_BUDGET bytes of keys and
 * values, taken in the order the kernel lists them; one that does not fit in what is left, has a
 * NUL in its value or vanished meanwhile is left out. Nothing here fails: a filesystem without
 * xattrs (ENOTSUP), a name list over the kernel's 64 KiB, or an unreadable file gives none. A
 * file without any costs one llistxattr. */
static void put_xattrs(struct buf *b, int xfd, const char *name) {
    static char list[XATTR_LIST_BUF];
    static char kv[XATTR_BUDGET + 1];
    ssize_t n = name ? llistxattr(name, list, sizeof list) : flistxattr(xfd, list, sizeof list);
    if (n <= 0 || list[n - 1] != 0) return;
    size_t used = 0;
    int count = 0;
    for (const char *x = list; x < list + n && count < MAX_XATTRS; x += strlen(x) + 1) {
        if (strncmp(x, XATTR_PREFIX, XATTR_PREFIX_LEN) != 0) continue;
        const char *key = x + XATTR_PREFIX_LEN;
        size_t kl = strlen(key);
        if (!kl || kl > XATTR_BUDGET - used) continue;
        size_t room = XATTR_BUDGET - used - kl;
        memcpy(kv, key, kl);
        kv[kl] = 0;
        /* With room 0 the kernel only reports the size: any value but an empty one is skipped. */
        char *val = kv + kl + 1;
        ssize_t vn = name ? lgetxattr(name, x, val, room) : fgetxattr(xfd, x, val, room);
        if (vn < 0 || (size_t)vn > room || memchr(val, 0, (size_t)vn)) continue;
        field_bytes(b, F_XATTR, kv, kl + 1 + (size_t)vn);
        used += kl + (size_t)vn;
        count++;
    }
}

/* A FileInfo as an ENTRY frame. Regular files and directories (the only ones that can carry
 * user.* xattrs) get their metadata from put_xattrs(xfd, xname) unless both are unset. */
static void put_fileinfo(struct buf *b, const char *name, const char *path, const struct stat *st,
                         const char *link, int xfd, const char *xname) {
    size_t at = frame_begin(b, T_ENTRY);
    field_str(b, F_NAME, name);
    field_str(b, F_PATH, path);
    field_str(b, F_TYPE, S_ISREG(st->st_mode) ? "file" : S_ISDIR(st->st_mode) ? "dir" :
                         S_ISLNK(st->st_mode) ? "symlink" : "other");
    field_int(b, F_SIZE, st->st_size);
    field_int(b, F_MODE, st->st_mode & 07777);
    field_int(b, F_MTIME, (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec);
    field_int(b, F_UID, st->st_uid);
    field_int(b, F_GID, st->st_gid);
    if (link) field_str(b, F_LINK, link);
    if ((xname || xfd >= 0) && (S_ISREG(st->st_mode) || S_ISDIR(st->st_mode)))
        put_xattrs(b, xfd, xname);
    frame_end(b, at);
}

static const char *display_name(struct target *t, const char *name) {
    if (strcmp(name, ".") != 0) return name;
    const char *s = strrchr(t->path, '/');
    return s && s[1] ? s + 1 : t->path;
}

/* Appends FileInfo of (dirfd, name) as an OK frame; the fd-relative lookup never follows. */
static void reply_info(struct target *t, int dirfd, const char *name, int frame_type) {
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) h_fail_errno(errno, "cannot stat", t->path);
    char link[PATH_MAX];
    const char *lp = NULL;
    if (S_ISLNK(st.st_mode)) {
        ssize_t n = readlinkat(dirfd, name, link, sizeof link - 1);
        if (n >= 0) {
            link[n] = 0;
            lp = link;
        }
    }
    /* xattrs are read by name from inside the directory: the *at() family has no l*xattr. */
    int here = fchdir(dirfd) == 0;
    size_t at = h_out.len;
    put_fileinfo(&h_out, display_name(t, name), t->path, &st, lp, -1, here ? name : NULL);
    h_out.d[at + 4] = (uint8_t)frame_type;
}

static void resolve_owner(const char *user, uid_t *uid, gid_t *gid) {
    struct ident id;
    char err[512];
    if (resolve_user(user, &id, err, sizeof err) < 0) h_fail("invalid", "%s", err);
    *uid = id.uid;
    *gid = id.gid;
}

static void op_stat(struct fields *f, struct target *t) {
    (void)f;
    char name[PATH_MAX];
    int pfd = open_parent(t, name, 0, 0, 0);
    reply_info(t, pfd, name, T_OK);
}

static void list_walk(int dfd, const char *prefix, int level, int depth) {
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return;
    }
    struct dirent *e;
    char path[PATH_MAX], link[PATH_MAX];
    int here = fchdir(dirfd(d)) == 0;  /* xattrs are read by name, relative to the directory */
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (snprintf(path, sizeof path, "%s/%s", strcmp(prefix, "/") ? prefix : "", e->d_name) >=
            (int)sizeof path)
            continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
        const char *lp = NULL;
        if (S_ISLNK(st.st_mode)) {
            ssize_t n = readlinkat(dirfd(d), e->d_name, link, sizeof link - 1);
            if (n >= 0) {
                link[n] = 0;
                lp = link;
            }
        }
        put_fileinfo(&h_out, e->d_name, path, &st, lp, -1, here ? e->d_name : NULL);
        if (h_out.len >= FILE_CHUNK) h_flush();
        if (S_ISDIR(st.st_mode) && level < depth) {
            int sub = openat(dirfd(d), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub >= 0) {
                list_walk(sub, path, level + 1, depth);
                here = fchdir(dirfd(d)) == 0;
            }
        }
    }
    closedir(d);
}

static void op_listdir(struct fields *f, struct target *t) {
    int bad = 0;
    int64_t depth = field_i64_or(f, F_DEPTH, 1, &bad);
    if (bad || depth < 1) h_fail("invalid", "depth must be at least 1");
    if (depth > MAX_LIST_DEPTH) depth = MAX_LIST_DEPTH;
    int dfd = (int)h_openat2(t->root, t->rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0, t->resolve);
    if (dfd < 0) h_resolve_fail(t, errno, "cannot list");
    list_walk(dfd, t->path, 1, (int)depth);
    size_t at = frame_begin(&h_out, T_END);
    frame_end(&h_out, at);
    h_flush();
}

static void op_read(struct fields *f, struct target *t) {
    (void)f;
    int fd = (int)h_openat2(t->root, t->rel, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0,
                            t->resolve);
    if (fd < 0) h_resolve_fail(t, errno, "cannot open");
    struct stat st;
    if (fstat(fd, &st) < 0) h_fail_errno(errno, "cannot stat", t->path);
    if (S_ISDIR(st.st_mode)) h_fail("is_a_directory", "%.1024s is a directory", t->path);
    if (!S_ISREG(st.st_mode)) h_fail("invalid", "%.1024s is not a regular file", t->path);
    set_cloexec_nonblock(fd, 0);
    size_t at = h_out.len;
    const char *slash = strrchr(t->path, '/');
    put_fileinfo(&h_out, slash && slash[1] ? slash + 1 : t->path, t->path, &st, NULL, fd, NULL);
    h_out.d[at + 4] = T_OK;
    h_flush();
    uint8_t *chunk = xrealloc(NULL, FILE_CHUNK);
    for (;;) {
        ssize_t n = read(fd, chunk, FILE_CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) h_fail_errno(errno, "cannot read", t->path);
        uint8_t h[HDR] = {0, 0, 0, 0, n ? T_DATA : T_END};
        put_be32(h, (uint32_t)n);
        struct iovec iov[2] = {{h, HDR}, {chunk, (size_t)n}};
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
        size_t left = HDR + (size_t)n;
        while (left) {
            ssize_t w = sendmsg(h_fd, &mh, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) _exit(1);
            left -= (size_t)w;
            while (w > 0 && mh.msg_iovlen) {
                size_t take = (size_t)w < mh.msg_iov->iov_len ? (size_t)w : mh.msg_iov->iov_len;
                mh.msg_iov->iov_base = (uint8_t *)mh.msg_iov->iov_base + take;
                mh.msg_iov->iov_len -= take;
                w -= (ssize_t)take;
                if (!mh.msg_iov->iov_len) { mh.msg_iov++; mh.msg_iovlen--; }
            }
        }
        if (!n) return;
    }
}

static int g_tmp_parent = -1;
static char g_tmp_name[NAME_MAX + 1];

static __attribute__((noreturn)) void write_abort(const char *code, const char *fmt, const char *a,
                                                  const char *b) {
    if (g_tmp_parent >= 0) unlinkat(g_tmp_parent, g_tmp_name, 0);
    if (!code) _exit(1);
    h_fail(code, fmt, a, b);
}

static int xattr_key_ok(const uint8_t *k, size_t n) {
    if (n < 1 || n > XATTR_KEY_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = k[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* WRITE's metadata, checked before anything is touched: keys without the prefix. */
static struct {
    const uint8_t *key, *value;
    size_t kl, vl;
} g_wx[MAX_XATTRS];
static int g_nwx;

static void xattrs_check(const struct fields *f) {
    size_t total = 0;
    for (size_t i = 0; i + 5 <= f->n;) {
        const uint8_t *v = f->p + i + 5;
        size_t vn = get_be32(f->p + i + 1);
        int key = f->p[i];
        i += 5 + vn;
        if (key != F_XATTR) continue;
        if (g_nwx == MAX_XATTRS) h_fail("invalid", "at most %d metadata entries", MAX_XATTRS);
        const uint8_t *nul = memchr(v, 0, vn);
        if (!nul) h_fail("invalid", "malformed metadata entry");
        size_t kl = (size_t)(nul - v), vl = vn - kl - 1;
        int shown = (int)(kl > XATTR_KEY_MAX ? XATTR_KEY_MAX : kl);
        if (!xattr_key_ok(v, kl))
            h_fail("invalid", "invalid metadata key %.*s: 1..%d of A-Z a-z 0-9 . _ -", shown,
                   (const char *)v, XATTR_KEY_MAX);
        if (vl > XATTR_VALUE_MAX)
            h_fail("invalid", "metadata value of %.*s is over %d bytes", shown, (const char *)v,
                   XATTR_VALUE_MAX);
        if (memchr(nul + 1, 0, vl))
            h_fail("invalid", "metadata value of %.*s has a NUL byte", shown, (const char *)v);
        for (int j = 0; j < g_nwx; j++)
            if (g_wx[j].kl == kl && memcmp(g_wx[j].key, v, kl) == 0)
                h_fail("invalid", "metadata key %.*s is given twice", shown, (const char *)v);
        total += kl + vl;
        if (total > XATTR_BUDGET) h_fail("invalid", "metadata over %u bytes in all", XATTR_BUDGET);
        g_wx[g_nwx].key = v;
        g_wx[g_nwx].kl = kl;
        g_wx[g_nwx].value = nul + 1;
        g_wx[g_nwx].vl = vl;
        g_nwx++;
    }
}

/* Sets the checked metadata on the new (still private) file; a failure aborts the write. */
static void xattrs_set(int fd, struct target *t) {
    char name[XATTR_PREFIX_LEN + XATTR_KEY_MAX + 1];
    for (int i = 0; i < g_nwx; i++) {
        memcpy(name, XATTR_PREFIX, XATTR_PREFIX_LEN);
        memcpy(name + XATTR_PREFIX_LEN, g_wx[i].key, g_wx[i].kl);
        name[XATTR_PREFIX_LEN + g_wx[i].kl] = 0;
        if (fsetxattr(fd, name, g_wx[i].value, g_wx[i].vl, 0) == 0) continue;
        int e = errno;
        if (e == ENOTSUP)
            write_abort("invalid", "cannot write %.1024s: %s", t->path,
                        "this filesystem keeps no metadata");
        if (e == ENOSPC || e == EDQUOT || e == E2BIG)
            write_abort("no_space", "cannot write %.1024s: %s", t->path,
                        "no room for its metadata on this filesystem");
        write_abort(errno_code(e), "cannot set metadata on %.1024s: %s", t->path, strerror(e));
    }
}

static void op_write(struct fields *f, struct target *t) {
    int bad = 0;
    int64_t mode = field_i64_or(f, F_MODE, 0644, &bad);
    char *user = field_strdup(f, F_USER, 0, &bad);
    if (bad || mode < 0 || mode > 07777) h_fail("invalid", "malformed write request");
    xattrs_check(f);
    uid_t uid;
    gid_t gid;
    resolve_owner(user, &uid, &gid);
    char name[PATH_MAX];
    int pfd = open_parent(t, name, 1, uid, gid);
    if (strcmp(name, ".") == 0) h_fail("is_a_directory", "%.1024s is a directory", t->path);
    struct stat st;
    if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
        h_fail("is_a_directory", "%.1024s is a directory", t->path);
    /* Write a temporary sibling and rename it over the target: readers never see a partial
     * file, an aborted upload leaves the old one, and a symlink at the target is replaced
     * rather than followed. */
    int fd = -1;
    for (int i = 0; i < 8 && fd < 0; i++) {
        uint32_t rnd = 0;
        if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) < 0) rnd = (uint32_t)wall_ns() ^ (uint32_t)i;
        snprintf(g_tmp_name, sizeof g_tmp_name, ".%.200s.corral-%08x", name, rnd);
        fd = openat(pfd, g_tmp_name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0 && errno != EEXIST) h_fail_errno(errno, "cannot create", t->path);
    }
    if (fd < 0) h_fail("io", "cannot create a temporary file next to %.1024s", t->path);
    g_tmp_parent = pfd;
    /* The new inode has no user.e2b.* of its own, so these replace whatever the old file had.
     * Set now, on the file still mode 0600 and ours, so a refusal comes before any data. */
    xattrs_set(fd, t);
    size_t at = frame_begin(&h_out, T_OK);
    frame_end(&h_out, at);
    if (h_send_all(h_out.d, h_out.len) < 0) write_abort(NULL, NULL, NULL, NULL);
    h_out.len = 0;
    uint8_t *payload = xrealloc(NULL, MAX_PAYLOAD);
    for (;;) {
        uint8_t h[HDR];
        if (h_read_full(h, HDR) < 0) write_abort(NULL, NULL, NULL, NULL);
        uint32_t len = get_be32(h);
        if ((h[4] != T_DATA && h[4] != T_END) || len > MAX_PAYLOAD)
            write_abort("invalid", "%s%s", "protocol error: ", "expected data frames");
        if (h_read_full(payload, len) < 0) write_abort(NULL, NULL, NULL, NULL);
        if (h[4] == T_END) break;
        for (size_t off = 0; off < len;) {
            ssize_t w = write(fd, payload + off, len - off);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) {
                int e = errno;
                write_abort(errno_code(e), "cannot write %.1024s: %s", t->path, strerror(e));
            }
            off += (size_t)w;
        }
    }
    if (fchown(fd, uid, gid) < 0 || fchmod(fd, (mode_t)mode) < 0) {
        int e = errno;
        write_abort(errno_code(e), "cannot set owner of %.1024s: %s", t->path, strerror(e));
    }
    if (close(fd) < 0) {
        int e = errno;
        write_abort(errno_code(e), "cannot write %.1024s: %s", t->path, strerror(e));
    }
    if (renameat(pfd, g_tmp_name, pfd, name) < 0) {
        int e = errno;
        write_abort(errno_code(e), "cannot replace %.1024s: %s", t->path, strerror(e));
    }
    g_tmp_parent = -1;
    reply_info(t, pfd, name, T_OK);
}

static void op_mkdir(struct fields *f, struct target *t) {
    int bad = 0;
    int parents = field_i64_or(f, F_PARENTS, 1, &bad) != 0;
    char *user = field_strdup(f, F_USER, 0, &bad);
    if (bad) h_fail("invalid", "malformed mkdir request");
    uid_t uid;
    gid_t gid;
    resolve_owner(user, &uid, &gid);
    char name[PATH_MAX];
    if (parents) {
        int fd = mkdir_p(t, t->rel, uid, gid);
        if (fd < 0) {
            if (errno == ENOTDIR) h_fail("exists", "%.1024s exists and is not a directory", t->path);
            h_resolve_fail(t, errno, "cannot create");
        }
        strcpy(name, ".");
        reply_info(t, fd, name, T_OK);
        return;
    }
    int pfd = open_parent(t, name, 0, 0, 0);
    if (mkdirat(pfd, name, 0755) < 0) h_fail_errno(errno, "cannot create", t->path);
    if (fchownat(pfd, name, uid, gid, AT_SYMLINK_NOFOLLOW) < 0) h_fail_errno(errno, "cannot chown", t->path);
    reply_info(t, pfd, name, T_OK);
}

/* Removes a tree without ever following a symlink: every step is relative to an fd opened with
 * O_NOFOLLOW, so a swapped-in symlink fails the open instead of redirecting the removal. */
static int rm_tree(int pfd, const char *name, int level) {
    if (level > MAX_RM_DEPTH) {
        errno = ELOOP;
        return -1;
    }
    for (int attempt = 0; attempt < 4; attempt++) {
        int dfd = openat(pfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (dfd < 0) return -1;
        DIR *d = fdopendir(dfd);
        if (!d) {
            close(dfd);
            return -1;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            struct stat st;
            if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                if (errno == ENOENT) continue;
                closedir(d);
                return -1;
            }
            int r = S_ISDIR(st.st_mode) ? rm_tree(dfd, e->d_name, level + 1)
                                        : unlinkat(dfd, e->d_name, 0);
            if (r < 0 && errno != ENOENT) {
                int err = errno;
                closedir(d);
                errno = err;
                return -1;
            }
        }
        closedir(d);
        if (unlinkat(pfd, name, AT_REMOVEDIR) == 0) return 0;
        if (errno != ENOTEMPTY) return -1;  /* something was created meanwhile: go again */
    }
    return -1;
}

static void op_remove(struct fields *f, struct target *t) {
    int bad = 0;
    int recursive = field_i64_or(f, F_RECURSIVE, 0, &bad) != 0;
    if (bad) h_fail("invalid", "malformed remove request");
    char name[PATH_MAX];
    int pfd = open_parent(t, name, 0, 0, 0);
    if (strcmp(name, ".") == 0) h_fail("invalid", "refusing to remove %.1024s itself", t->path);
    struct stat st;
    if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) h_fail_errno(errno, "cannot remove", t->path);
    int r;
    if (S_ISDIR(st.st_mode)) r = recursive ? rm_tree(pfd, name, 0) : unlinkat(pfd, name, AT_REMOVEDIR);
    else r = unlinkat(pfd, name, 0);
    if (r < 0) {
        if (errno == ENOTEMPTY) h_fail("not_empty", "directory %.1024s is not empty", t->path);
        h_fail_errno(errno, "cannot remove", t->path);
    }
    size_t at = frame_begin(&h_out, T_OK);
    frame_end(&h_out, at);
}

static void op_rename(struct fields *f, struct target *t) {
    int bad = 0;
    char *dst = field_strdup(f, F_DST, 0, &bad);
    char *beneath = field_strdup(f, F_BENEATH, 0, &bad);
    if (bad || !dst) h_fail("invalid", "malformed rename request");
    static struct target d;
    target_init(&d, dst, beneath);
    char sname[PATH_MAX], dname[PATH_MAX];
    int spfd = open_parent(t, sname, 0, 0, 0);
    int dpfd = open_parent(&d, dname, 0, 0, 0);
    if (strcmp(sname, ".") == 0 || strcmp(dname, ".") == 0)
        h_fail("invalid", "cannot rename %.1024s to %.1024s", t->path, d.path);
    if (renameat(spfd, sname, dpfd, dname) < 0) {
        int e = errno;
        h_fail(errno_code(e), "cannot rename %.1024s to %.1024s: %s", t->path, d.path, strerror(e));
    }
    reply_info(&d, dpfd, dname, T_OK);
}

static void op_symlink(struct fields *f, struct target *t) {
    int bad = 0;
    char *target = field_strdup(f, F_TARGET, 0, &bad);
    char *user = field_strdup(f, F_USER, 0, &bad);
    if (bad || !target || !*target || strlen(target) >= PATH_MAX)
        h_fail("invalid", "malformed symlink request");
    uid_t uid;
    gid_t gid;
    resolve_owner(user, &uid, &gid);
    char name[PATH_MAX];
    int pfd = open_parent(t, name, 1, uid, gid);
    if (symlinkat(target, pfd, name) < 0) h_fail_errno(errno, "cannot create", t->path);
    if (fchownat(pfd, name, uid, gid, AT_SYMLINK_NOFOLLOW) < 0) h_fail_errno(errno, "cannot chown", t->path);
    size_t at = frame_begin(&h_out, T_OK);
    frame_end(&h_out, at);
}

/* ------------------------------------------------------------------ watch (helper) */

/* WATCH streams inotify events of a directory (and with RECURSIVE of every directory below it)
 * until the host hangs up. The directory is opened as LISTDIR opens it; every one below it from
 * its parent's fd (or step by step from the watched directory's fd) with O_NOFOLLOW. A watch is
 * added with fchdir() to that fd and inotify_add_watch("."), so no path is resolved twice.
 * A reference to a removed directory (an fd, a cwd) holds back its IN_DELETE_SELF, so we leave
 * every directory after watching it, and the fd of the watched one is closed as soon as a
 * periodic fstat sees it unlinked. Memory is bounded: at most MAX_WATCHES table entries and one
 * read buffer; a host that does not read blocks us in send() while the kernel queue fills and
 * overflows ("too many events"). */

#define WATCH_EVENTS (IN_CREATE | IN_MODIFY | IN_DELETE | IN_DELETE_SELF | IN_MOVED_FROM | \
                      IN_MOVED_TO | IN_MOVE_SELF | IN_ATTRIB)

struct wslot {
    int wd;      /* 0: free (the kernel numbers watches from 1) */
    char *path;  /* relative to the watched directory, "" for itself */
};

static struct wslot *w_tab;
static int w_count, w_ifd = -1, w_root_fd = -1, w_root_wd = -1, w_recursive;
static const char *w_shown;  /* the watched path as asked, for messages */
static uint32_t w_pend_cookie;
static int64_t w_pend_deadline;
static char *w_pend_path;    /* a directory moved away whose MOVED_TO may still come */

static size_t w_hash(int wd) {
    return (size_t)(((uint32_t)wd * 2654435761u) & (WATCH_SLOTS - 1));
}

static struct wslot *w_find(int wd) {
    if (wd <= 0) return NULL;
    for (size_t i = w_hash(wd);; i = (i + 1) & (WATCH_SLOTS - 1)) {
        if (w_tab[i].wd == wd) return &w_tab[i];
        if (!w_tab[i].wd) return NULL;  /* the table is never full, so this ends */
    }
}

/* Linear probing with backward-shift deletion: no tombstones, probe chains stay short. */
static void w_del(struct wslot *s) {
    free(s->path);
    size_t i = (size_t)(s - w_tab);
    for (size_t j = i;;) {
        j = (j + 1) & (WATCH_SLOTS - 1);
        if (!w_tab[j].wd) break;
        size_t h = w_hash(w_tab[j].wd);
        int stays = j > i ? (h > i && h <= j) : (h > i || h <= j);
        if (!stays) {
            w_tab[i] = w_tab[j];
            i = j;
        }
    }
    w_tab[i].wd = 0;
    w_tab[i].path = NULL;
    w_count--;
}

static int w_under(const char *path, const char *dir, size_t n) {
    return strncmp(path, dir, n) == 0 && (path[n] == 0 || path[n] == '/');
}

static void w_emit(const char *name, const char *kind) {
    size_t at = frame_begin(&h_out, T_EVENT);
    field_str(&h_out, F_NAME, name);
    field_str(&h_out, F_KIND, kind);
    frame_end(&h_out, at);
    if (h_out.len >= FILE_CHUNK) h_flush();
}

/* Watches the directory open as dfd (not consumed) under rel; its wd, or -1 if it is gone. */
static int w_add(int dfd, const char *rel) {
    int wd = -1, e = errno;
    if (fchdir(dfd) == 0) {
        wd = inotify_add_watch(w_ifd, ".", WATCH_EVENTS | IN_ONLYDIR);
        e = errno;
        if (chdir("/") < 0) { /* staying would only delay that directory's IN_IGNORED */ }
    } else {
        e = errno;
    }
    errno = e;
    if (wd < 0) {
        if (errno == ENOSPC)
            h_fail("no_space", "cannot watch %.1024s: the inotify watch limit is reached", w_shown);
        if (errno == ENOMEM) h_fail("no_space", "cannot watch %.1024s: out of memory", w_shown);
        return -1;
    }
    struct wslot *s = w_find(wd);
    if (s && wd == w_root_wd) return -1;  /* the root again (a bind mount of it): not below it */
    if (s) {  /* the same directory again (found twice while things moved): keep the newest */
        free(s->path);
        s->path = xstrndup(rel, strlen(rel));
        return wd;
    }
    if (w_count >= MAX_WATCHES) {
        inotify_rm_watch(w_ifd, wd);
        h_fail("no_space", "cannot watch %.1024s: more than %d directories", w_shown, MAX_WATCHES);
    }
    size_t i = w_hash(wd);
    while (w_tab[i].wd) i = (i + 1) & (WATCH_SLOTS - 1);
    w_tab[i].wd = wd;
    w_tab[i].path = xstrndup(rel, strlen(rel));
    w_count++;
    return wd;
}

static void w_walk(int dfd, char *path, size_t len, int report, int level);

/* Goes through the directory dfd (consumed) whose relative path is path[0..len): watches every
 * subdirectory and, with report, sends a create event for every entry (they appeared after the
 * watch started, before the kernel could tell us). path is a PATH_MAX buffer, restored after. */
static void w_scan(int dfd, char *path, size_t len, int report, int level) {
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        size_t nl = strlen(e->d_name), sub = len ? len + 1 + nl : nl;
        if (sub >= PATH_MAX) continue;  /* a name we could not report */
        if (len) path[len] = '/';
        memcpy(path + (len ? len + 1 : 0), e->d_name, nl + 1);
        if (report) w_emit(path, "create");
        int isdir = e->d_type == DT_DIR;
        if (e->d_type == DT_UNKNOWN) {
            struct stat st;
            isdir = fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
        }
        if (isdir) {
            int sfd = openat(dirfd(d), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sfd >= 0) w_walk(sfd, path, sub, report, level + 1);
        }
        path[len] = 0;
    }
    closedir(d);
}

/* Watches the directory dfd (consumed) at path[0..len), `level` components deep, and everything
 * below it. The watch is added before the directory is read, so an entry made meanwhile is seen
 * by one or the other (or both: a create racing the scan may be reported twice). */
static void w_walk(int dfd, char *path, size_t len, int report, int level) {
    if (level > MAX_WATCH_DEPTH)
        h_fail("invalid", "cannot watch %.1024s: directories nest deeper than %d levels", w_shown,
               MAX_WATCH_DEPTH);
    if (w_add(dfd, path) < 0) {
        close(dfd);
        return;
    }
    w_scan(dfd, path, len, report, level);
}

/* Opens a directory below the root by its relative path, never following a symlink. */
static int w_open_rel(const char *rel) {
    int cur = w_root_fd;
    if (cur < 0) return -1;  /* the watched directory is removed: nothing new comes into it */
    char comp[NAME_MAX + 1];
    for (const char *s = rel; *s;) {
        const char *e = strchrnul(s, '/');
        size_t n = (size_t)(e - s);
        int fd = -1;
        if (n && n <= NAME_MAX) {
            memcpy(comp, s, n);
            comp[n] = 0;
            fd = openat(cur, comp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        }
        if (cur != w_root_fd) close(cur);
        if (fd < 0) return -1;
        cur = fd;
        s = *e ? e + 1 : e;
    }
    return cur == w_root_fd ? -1 : cur;
}

/* Drops (from) or renames (to != NULL) the table entries of the subtree at from. */
static void w_retree(const char *from, const char *to) {
    size_t fl = strlen(from), tl = to ? strlen(to) : 0;
    int *drop = xrealloc(NULL, sizeof(int) * (size_t)(w_count + 1));
    int nd = 0;
    for (size_t i = 0; i < WATCH_SLOTS; i++) {
        struct wslot *s = &w_tab[i];
        if (!s->wd || s->wd == w_root_wd || !w_under(s->path, from, fl)) continue;
        size_t rest = strlen(s->path) - fl;
        if (!to || tl + rest >= PATH_MAX) {
            drop[nd++] = s->wd;
            continue;
        }
        char *np = xrealloc(NULL, tl + rest + 1);
        memcpy(np, to, tl);
        memcpy(np + tl, s->path + fl, rest + 1);
        free(s->path);
        s->path = np;
    }
    /* Their queued events and IN_IGNORED find no entry and are skipped. */
    for (int k = 0; k < nd; k++) {
        inotify_rm_watch(w_ifd, drop[k]);
        struct wslot *s = w_find(drop[k]);
        if (s) w_del(s);
    }
    free(drop);
}

/* A directory's MOVED_FROM without its MOVED_TO: it left the tree, stop watching it. */
static void w_pend_drop(void) {
    if (!w_pend_path) return;
    w_retree(w_pend_path, NULL);
    free(w_pend_path);
    w_pend_path = NULL;
}

static __attribute__((noreturn)) void w_end(void) {
    size_t at = frame_begin(&h_out, T_END);
    frame_end(&h_out, at);
    h_flush();
    _exit(0);
}

/* fsnotify's mapping (Go, inotify backend): what E2B's envd reports. */
static const char *w_kind(uint32_t m) {
    if (m & (IN_CREATE | IN_MOVED_TO)) return "create";
    if (m & IN_MODIFY) return "write";
    if (m & (IN_DELETE | IN_DELETE_SELF)) return "remove";
    if (m & (IN_MOVED_FROM | IN_MOVE_SELF)) return "rename";
    if (m & IN_ATTRIB) return "chmod";
    return NULL;
}

static void w_event(const struct inotify_event *ev) {
    if (ev->mask & IN_Q_OVERFLOW) h_fail("io", "too many events");
    int paired = w_pend_path && (ev->mask & IN_MOVED_TO) && ev->cookie == w_pend_cookie;
    if (w_pend_path && !paired) w_pend_drop();
    struct wslot *s = w_find(ev->wd);
    if (!s) return;  /* a watch we dropped: what it still had queued */
    int root = ev->wd == w_root_wd;
    if (ev->mask & IN_IGNORED) {
        if (root) w_end();  /* the directory is gone (removed, or its filesystem unmounted) */
        w_del(s);
        return;
    }
    const char *kind = w_kind(ev->mask);
    if (!kind) return;
    if (!ev->len || !ev->name[0]) {
        /* A subdirectory's own change is reported by its parent's watch, under its name. */
        if (root) w_emit(".", kind);
        return;
    }
    char path[PATH_MAX];
    size_t pl = strlen(s->path), nl = strlen(ev->name), len = pl ? pl + 1 + nl : nl;
    if (len >= PATH_MAX) return;
    if (pl) {
        memcpy(path, s->path, pl);
        path[pl] = '/';
    }
    memcpy(path + (pl ? pl + 1 : 0), ev->name, nl + 1);
    w_emit(path, kind);
    if (!w_recursive || !(ev->mask & IN_ISDIR)) return;
    if (ev->mask & IN_MOVED_FROM) {
        w_pend_cookie = ev->cookie;
        w_pend_path = xstrndup(path, len);
        w_pend_deadline = mono_ms() + MOVE_PAIR_MS;
    } else if (paired) {
        /* Renamed inside the tree: its watches stay, under the new names. */
        w_retree(w_pend_path, path);
        free(w_pend_path);
        w_pend_path = NULL;
    } else if (ev->mask & (IN_CREATE | IN_MOVED_TO)) {
        int fd = w_open_rel(path);
        int level = 1;
        for (const char *c = path; *c; c++) level += *c == '/';
        if (fd >= 0) w_walk(fd, path, len, 1, level);
    }
}

/* A watch helper may live for hours, and fork left it sharing every page of the agent's heap:
 * each one the agent rewrites later (output rings above all) would stay here as a private copy.
 * Let go of them. */
static void w_shed_agent_memory(void) {
    for (struct proc *p = g_procs; p; p = p->next) {
        for (int s = 0; s < 2; s++) {
            free(p->out[s].buf);
            p->out[s].buf = NULL;
        }
        for (struct conn *c = p->subs; c; c = c->sub_next) {
            free(c->out.d);
            c->out.d = NULL;
        }
        for (struct conn *c = p->q_head; c; c = c->q_next) {
            free(c->q_data);
            c->q_data = NULL;
        }
    }
#ifdef __GLIBC__
    malloc_trim(0);  /* also returns free pages inside the heap, not only at its top */
#endif
}

static void op_watch(struct fields *f, struct target *t) {
    int bad = 0;
    w_recursive = field_i64_or(f, F_RECURSIVE, 0, &bad) != 0;
    if (bad) h_fail("invalid", "malformed watch request");
    w_shown = t->path;
    w_root_fd = (int)h_openat2(t->root, t->rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0, t->resolve);
    if (w_root_fd < 0) h_resolve_fail(t, errno, "cannot watch");
    close(t->root);  /* it may be the watched directory itself: see above */
    t->root = -1;
    w_ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w_ifd < 0) {
        int e = errno;
        if (e == EMFILE) h_fail("no_space", "cannot watch %.1024s: too many inotify instances", t->path);
        h_fail_errno(e, "cannot watch", t->path);
    }
    w_shed_agent_memory();
    w_tab = xrealloc(NULL, sizeof *w_tab * WATCH_SLOTS);
    memset(w_tab, 0, sizeof *w_tab * WATCH_SLOTS);
    w_root_wd = w_add(w_root_fd, "");
    if (w_root_wd < 0) h_fail_errno(errno, "cannot watch", t->path);
    if (w_recursive) {
        static char path[PATH_MAX];
        int dfd = fcntl(w_root_fd, F_DUPFD_CLOEXEC, 3);
        if (dfd < 0) h_fail_errno(errno, "cannot watch", t->path);
        w_scan(dfd, path, 0, 0, 0);
    }
    /* Armed: whatever happens from here on is in the kernel's queue. */
    size_t at = frame_begin(&h_out, T_OK);
    frame_end(&h_out, at);
    h_flush();
    static char buf[64 * 1024] __attribute__((aligned(__alignof__(struct inotify_event))));
    int64_t next_check = mono_ms() + ROOT_CHECK_MS;
    for (;;) {
        int64_t now = mono_ms(), wake = w_root_fd >= 0 ? next_check : -1;
        if (w_pend_path && (wake < 0 || w_pend_deadline < wake)) wake = w_pend_deadline;
        int timeout = wake < 0 ? -1 : wake <= now ? 0 : (int)(wake - now);
        struct pollfd p[2] = {{.fd = h_fd, .events = POLLIN | POLLRDHUP}, {.fd = w_ifd, .events = POLLIN}};
        int r = poll(p, 2, timeout);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) _exit(1);
        /* The host sends nothing more; end of stream (or an error) means it is gone. */
        if (p[0].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) _exit(0);
        if (p[0].revents & POLLIN) {
            uint8_t junk[4096];
            ssize_t n = recv(h_fd, junk, sizeof junk, MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) _exit(0);
        }
        now = mono_ms();
        if (w_root_fd >= 0 && now >= next_check) {
            /* Removed: let go, so that the kernel sends IN_DELETE_SELF and IN_IGNORED. */
            struct stat st;
            next_check = now + ROOT_CHECK_MS;
            if (fstat(w_root_fd, &st) == 0 && st.st_nlink == 0) {
                close(w_root_fd);
                w_root_fd = -1;
            }
        }
        if (!(p[1].revents & POLLIN)) {
            if (w_pend_path && now >= w_pend_deadline) w_pend_drop();
            continue;
        }
        ssize_t n = read(w_ifd, buf, sizeof buf);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) h_fail_errno(n < 0 ? errno : EIO, "cannot read the events of", t->path);
        for (size_t off = 0; off + sizeof(struct inotify_event) <= (size_t)n;) {
            const struct inotify_event *ev = (const struct inotify_event *)(buf + off);
            off += sizeof *ev + ev->len;
            if (off > (size_t)n) break;
            w_event(ev);
        }
        h_flush();
    }
}

static __attribute__((noreturn)) void helper_main(int fd, int type, const uint8_t *payload,
                                                  size_t len) {
    /* Drop every fd of the agent: an inherited stdin pipe end would keep a process from ever
     * seeing EOF for as long as this helper runs. */
    int hi = fd;
    if (fd != 3) {
        hi = dup3(fd, 3, O_CLOEXEC) < 0 ? fd : 3;
    }
    if (syscall(SYS_close_range, hi + 1, ~0U, 0) < 0) {
        for (int i = hi + 1; i < 65536; i++) close(i);
    }
    for (int i = 3; i < hi; i++) close(i);
    h_fd = hi;
    set_cloexec_nonblock(h_fd, 0);
    struct fields f = {payload, len};
    int bad = 0;
    char *path = field_strdup(&f, F_PATH, 0, &bad);
    char *beneath = field_strdup(&f, F_BENEATH, 0, &bad);
    if (bad) h_fail("invalid", "malformed request");
    struct target t;
    target_init(&t, path, beneath);
    switch (type) {
    case T_STAT: op_stat(&f, &t); break;
    case T_LISTDIR: op_listdir(&f, &t); break;
    case T_READ: op_read(&f, &t); break;
    case T_WRITE: op_write(&f, &t); break;
    case T_MKDIR: op_mkdir(&f, &t); break;
    case T_REMOVE: op_remove(&f, &t); break;
    case T_RENAME: op_rename(&f, &t); break;
    case T_SYMLINK: op_symlink(&f, &t); break;
    case T_WATCH: op_watch(&f, &t); break;
    }
    h_flush();
    _exit(0);
}

/* ------------------------------------------------------------------ request dispatch */

static void op_list(struct conn *c) {
    for (struct proc *p = g_procs; p; p = p->next) {
        size_t at = frame_begin(&c->out, T_ENTRY);
        field_int(&c->out, F_PID, p->pid);
        for (int i = 0; i < p->argc; i++) field_str(&c->out, F_ARG, p->argv[i]);
        field_str(&c->out, F_CWD, p->cwd);
        field_str(&c->out, F_USER, p->user);
        if (p->tag) field_str(&c->out, F_TAG, p->tag);
        field_int(&c->out, F_PTY, p->pty);
        field_int(&c->out, F_RUNNING, !p->reaped);
        if (p->reaped) field_int(&c->out, F_EXIT, p->exit_code);
        field_int(&c->out, F_STARTED, p->started_ns);
        frame_end(&c->out, at);
    }
    size_t at = frame_begin(&c->out, T_END);
    frame_end(&c->out, at);
    c->state = C_DONE;
    conn_flush(c);
}

static struct proc *want_proc(struct conn *c, struct fields *f) {
    int64_t pid;
    if (field_i64(f, F_PID, &pid) != 1) {
        conn_error(c, "invalid", "pid is required");
        return NULL;
    }
    struct proc *p = proc_find(pid);
    if (!p) conn_error(c, "not_found", "no process %lld", (long long)pid);
    return p;
}

static void dispatch(struct conn *c, int type, const uint8_t *payload, size_t len) {
    struct fields f = {payload, len};
    if (type != T_PING && !fields_valid(payload, len)) {
        conn_error(c, "invalid", "malformed request fields");
        return;
    }
    struct proc *p;
    int bad = 0;
    switch (type) {
    case T_PING: {
        size_t at = frame_begin(&c->out, T_OK);
        field_str(&c->out, F_VERSION, AGENT_VERSION);
        field_str(&c->out, F_PROTOCOL, PROTOCOL_VERSION);
        frame_end(&c->out, at);
        c->state = C_DONE;
        conn_flush(c);
        return;
    }
    case T_SPAWN: {
        struct spawn_req r;
        const char *why = spawn_req_parse(&f, &r);
        if (why) {
            conn_error(c, "invalid", "%s", why);
            spawn_req_free(&r);
            return;
        }
        char err[1024];
        const char *code;
        p = do_spawn(&r, &code, err, sizeof err);
        int attach = r.attach;
        spawn_req_free(&r);
        if (!p) {
            conn_error(c, code, "%s", err);
            return;
        }
        conn_ok_pid(c, p->pid, !attach);
        if (attach && c->dead) kill(-p->pid, SIGKILL);  /* its owner is already gone */
        else if (attach) subscribe(c, p, 1, 1, 1);
        return;
    }
    case T_ATTACH:
    case T_WAIT: {
        if (!(p = want_proc(c, &f))) return;
        int replay = field_i64_or(&f, F_REPLAY, 1, &bad) != 0;
        conn_ok_pid(c, p->pid, 0);
        if (!c->dead) subscribe(c, p, type == T_ATTACH, replay, 0);
        return;
    }
    case T_LIST:
        op_list(c);
        return;
    case T_STDIN:
    case T_CLOSE_STDIN: {
        if (!(p = want_proc(c, &f))) return;
        const uint8_t *v = NULL;
        size_t vn = 0;
        if (type == T_STDIN) field_get(&f, F_DATA, 0, &v, &vn);
        if (type == T_CLOSE_STDIN && p->pty) {
            v = (const uint8_t *)"\x04";  /* EOF for a terminal is ^D at the line discipline */
            vn = 1;
        }
        if (p->finished) {
            conn_error(c, "conflict", "process %d has exited", (int)p->pid);
            return;
        }
        c->q_data = xrealloc(NULL, vn);
        if (vn) memcpy(c->q_data, v, vn);
        c->q_len = vn;
        c->q_close = type == T_CLOSE_STDIN;
        c->q_proc = p;
        c->state = C_STDIN;
        struct conn **pp = &p->q_head;
        while (*pp) pp = &(*pp)->q_next;
        *pp = c;
        stdin_pump(p);
        return;
    }
    case T_SETENV: {
        /* Replace the environment every later process starts from (a microvm cloned from a
         * warm template learns its own this way; a container gets it at start). */
        int n = field_count(&f, F_ENV), k = 0;
        char **env = xrealloc(NULL, sizeof(char *) * ((size_t)n + 1));
        for (int i = 0; i < n && !bad; i++) {
            char *e = field_strdup(&f, F_ENV, i, &bad);
            if (!e) break;
            char *eq = strchr(e, '=');
            if (!eq || eq == e) bad = 1;
            env[k++] = e;
        }
        env[k] = NULL;
        if (bad) {
            for (int i = 0; i < k; i++) free(env[i]);
            free(env);
            conn_error(c, "invalid", "environment entries must be KEY=VALUE");
            return;
        }
        for (char **e = g_env; *e; e++) free(*e);
        free(g_env);
        g_env = env;
        size_t at = frame_begin(&c->out, T_OK);
        frame_end(&c->out, at);
        c->state = C_DONE;
        conn_flush(c);
        return;
    }
    case T_SIGNAL: {
        if (!(p = want_proc(c, &f))) return;
        int64_t sig = field_i64_or(&f, F_SIGNO, 0, &bad);
        if (bad || sig < 1 || sig > 64) {
            conn_error(c, "invalid", "signal must be within 1..64");
            return;
        }
        if (p->reaped) {
            conn_error(c, "conflict", "process %d has exited", (int)p->pid);
            return;
        }
        if (kill(-p->pid, (int)sig) < 0 && kill(p->pid, (int)sig) < 0) {
            conn_error(c, "io", "kill %d: %s", (int)p->pid, strerror(errno));
            return;
        }
        conn_ok_pid(c, 0, 1);
        return;
    }
    case T_RESIZE: {
        if (!(p = want_proc(c, &f))) return;
        int64_t rows = field_i64_or(&f, F_ROWS, 0, &bad), cols = field_i64_or(&f, F_COLS, 0, &bad);
        if (bad || rows < 1 || rows > 65535 || cols < 1 || cols > 65535) {
            conn_error(c, "invalid", "rows and cols must be within 1..65535");
            return;
        }
        if (!p->pty) {
            conn_error(c, "invalid", "process %d has no terminal", (int)p->pid);
            return;
        }
        struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
        int mfd = p->in_fd >= 0 ? p->in_fd : p->out[0].fd;
        if (mfd < 0 || ioctl(mfd, TIOCSWINSZ, &ws) < 0) {
            conn_error(c, "conflict", "the terminal of process %d is gone", (int)p->pid);
            return;
        }
        conn_ok_pid(c, 0, 1);
        return;
    }
    case T_STAT: case T_LISTDIR: case T_READ: case T_WRITE: case T_MKDIR: case T_REMOVE:
    case T_RENAME: case T_SYMLINK: case T_WATCH: {
        pid_t pid = fork();
        if (pid == 0) helper_main(c->fd, type, payload, len);
        if (pid < 0) {
            conn_error(c, "io", "fork: %s", strerror(errno));
            return;
        }
        conn_close(c);  /* the helper owns the connection now */
        return;
    }
    default:
        conn_error(c, "invalid", "unknown request type %d", type);
    }
}

static void conn_on_read(struct conn *c) {
    for (int round = 0; round < 64 && !c->dead; round++) {
        if (c->state != C_REQ) {
            /* Nothing more is expected; read to notice the host going away. */
            uint8_t scratch[4096];
            ssize_t n = read(c->fd, scratch, sizeof scratch);
            if (n > 0) continue;
            if (n < 0 && (errno == EINTR)) continue;
            if (n < 0 && errno == EAGAIN) return;
            conn_close(c);
            return;
        }
        size_t need = c->in_len < HDR ? HDR : HDR + c->want;
        ssize_t n = read(c->fd, c->in + c->in_len, need - c->in_len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            conn_close(c);
            return;
        }
        c->in_len += (size_t)n;
        if (c->in_len == HDR) {
            c->want = get_be32(c->in);
            if (c->want > MAX_PAYLOAD) {
                conn_error(c, "invalid", "frame of %u bytes exceeds the limit", c->want);
                return;
            }
            c->in = xrealloc(c->in, HDR + c->want);
        }
        if (c->in_len == HDR + c->want) {
            uint8_t *frame = c->in;
            c->in = NULL;
            c->in_len = 0;
            dispatch(c, frame[4], frame + HDR, c->want);
            free(frame);
            if (!c->dead && c->state == C_REQ) conn_close(c);  /* every request changes state */
        }
    }
}

static void on_accept(void) {
    for (;;) {
        int fd = accept4(g_listen, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN) {
                /* Out of fds or memory: stop listening for a moment instead of spinning. */
                ep_watch(g_listen, &g_listen_ev, 0);
                g_listen_retry_ms = mono_ms() + LISTEN_RETRY_MS;
            }
            return;
        }
        if (g_nconns >= MAX_CONNS) {
            close(fd);
            continue;
        }
        struct conn *c = xrealloc(NULL, sizeof *c);
        memset(c, 0, sizeof *c);
        c->fd = fd;
        c->ev = (struct evsrc){.type = EV_CONN, .obj = c};
        c->in = xrealloc(NULL, HDR);
        g_nconns++;
        ep_watch(fd, &c->ev, EPOLLIN | EPOLLRDHUP);
    }
}

static void on_signals(void) {
    struct signalfd_siginfo si[16];
    while (read(g_sigfd, si, sizeof si) > 0) {}
    /* SIGTERM, SIGINT, SIGHUP and the rest are read and dropped: pid 1 stays up. */
    on_sigchld();
}

static int next_timeout(void) {
    int64_t now = mono_ms(), best = -1;
    if (g_listen_retry_ms) best = g_listen_retry_ms;
    for (struct proc *p = g_procs; p; p = p->next)
        if (p->reaped && !p->finished && !p->draining && (best < 0 || p->deadline_ms < best))
            best = p->deadline_ms;
    if (best < 0) return -1;
    return best <= now ? 0 : (int)(best - now);
}

static void on_timers(void) {
    int64_t now = mono_ms();
    if (g_listen_retry_ms && g_listen_retry_ms <= now) {
        g_listen_retry_ms = 0;
        ep_watch(g_listen, &g_listen_ev, EPOLLIN);
    }
    for (struct proc *p = g_procs; p; p = p->next) {
        if (p->reaped && !p->finished && !p->draining && p->deadline_ms <= now) {
            p->draining = 1;
            p->out[0].drain_left = p->out[1].drain_left = DRAIN_BUDGET;
            p->kick = g_kick = 1;
        }
    }
    while (g_kick) {
        g_kick = 0;
        for (struct proc *p = g_procs; p; p = p->next) {
            if (!p->kick) continue;
            p->kick = 0;
            for (int s = 0; s < 2; s++)
                if (p->out[s].fd >= 0 && !p->out[s].paused) stream_read(p, s);
        }
    }
}

static void loop(void) {
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(g_ep, evs, 64, next_timeout());
        for (int i = 0; i < n; i++) {
            struct evsrc *ev = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            switch (ev->type) {
            case EV_LISTEN: on_accept(); break;
            case EV_SIGNAL: on_signals(); break;
            case EV_CONN: {
                struct conn *c = ev->obj;
                if (c->dead) break;
                if (e & EPOLLOUT) {
                    if (c->proc) pump(c);
                    else conn_flush(c);
                }
                if (!c->dead && (e & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))) conn_on_read(c);
                break;
            }
            case EV_OUT: {
                struct proc *p = ev->obj;
                if (p->out[ev->idx].fd >= 0 && !p->out[ev->idx].paused) stream_read(p, ev->idx);
                break;
            }
            case EV_IN: {
                struct proc *p = ev->obj;
                if (p->in_fd >= 0) stdin_pump(p);
                break;
            }
            }
        }
        on_timers();
        if (g_gc) gc_procs();
        while (g_grave) {
            struct conn *c = g_grave;
            g_grave = c->grave_next;
            free(c);
        }
    }
}

/* ------------------------------------------------------------------ startup */

static __attribute__((noreturn)) void die(const char *what) {
    dprintf(2, "corral-agent: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void) {
    dprintf(2, "usage: corral-agent --listen-fd N | --listen PATH | --version\n");
    exit(2);
}

int main(int argc, char **argv) {
    int listen_fd = -1;
    const char *listen_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--version") == 0) {
            printf("corral-agent %s (protocol %s)\n", AGENT_VERSION, PROTOCOL_VERSION);
            return 0;
        } else if (strcmp(argv[i], "--listen-fd") == 0 && i + 1 < argc) {
            unsigned long v;
            if (!parse_id(argv[++i], &v) || v > INT_MAX) usage();
            listen_fd = (int)v;
        } else if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
            listen_path = argv[++i];
        } else {
            usage();
        }
    }
    if ((listen_fd < 0) == !listen_path) usage();

    /* Nothing we hold may leak into sandbox processes. */
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        for (int fd = 3; fd < 1024; fd++) fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    /* fds 0..2 must be taken, or a pipe could land there and lose CLOEXEC semantics. */
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0) continue;
        int n = open("/dev/null", O_RDWR);
        if (n < 0) {
            int pfd[2];
            if (pipe(pfd) == 0) n = pfd[0];
        }
        if (n >= 0 && n != fd) {
            dup2(n, fd);
            close(n);
        }
    }
    umask(022);
    /* Three fds per process and one per connection: take what the hard limit allows for
     * ourselves; children get the original limit back. */
    if (getrlimit(RLIMIT_NOFILE, &g_nofile) == 0) {
        struct rlimit mine = g_nofile;
        mine.rlim_cur = mine.rlim_max < 65536 ? mine.rlim_max : 65536;
        if (mine.rlim_cur > g_nofile.rlim_cur) setrlimit(RLIMIT_NOFILE, &mine);
    } else {
        g_nofile.rlim_cur = g_nofile.rlim_max = 1024;
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    /* Not dumpable: root inside the sandbox (without CAP_SYS_PTRACE) cannot ptrace us. */
    prctl(PR_SET_DUMPABLE, 0);

    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    g_sigfd = signalfd(-1, &all, SFD_NONBLOCK | SFD_CLOEXEC);
    if (g_sigfd < 0) die("signalfd");

    extern char **environ;
    size_t nenv = 0;
    while (environ && environ[nenv]) nenv++;
    g_env = xrealloc(NULL, sizeof(char *) * (nenv + 1));
    for (size_t i = 0; i < nenv; i++) g_env[i] = xstrndup(environ[i], strlen(environ[i]));
    g_env[nenv] = NULL;

    if (listen_path) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(listen_path) >= sizeof sa.sun_path) {
            errno = ENAMETOOLONG;
            die(listen_path);
        }
        strcpy(sa.sun_path, listen_path);
        g_listen = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (g_listen < 0) die("socket");
        unlink(listen_path);
        mode_t old = umask(077);
        if (bind(g_listen, (struct sockaddr *)&sa, sizeof sa) < 0) die(listen_path);
        umask(old);
        if (listen(g_listen, 1024) < 0) die("listen");
    } else {
        g_listen = listen_fd;
        int acc = 0;
        socklen_t al = sizeof acc;
        if (getsockopt(g_listen, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) < 0 || !acc) {
            if (errno == 0) errno = EINVAL;
            die("--listen-fd is not a listening socket");
        }
        set_cloexec_nonblock(g_listen, 1);
    }

    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0) die("epoll_create1");
    ep_watch(g_listen, &g_listen_ev, EPOLLIN);
    ep_watch(g_sigfd, &g_sig_ev, EPOLLIN);
    if (!g_listen_ev.events) die("cannot watch the listening socket");
    loop();
}
