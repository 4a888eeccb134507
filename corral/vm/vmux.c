/* corral-vmux: the guest end of corral's agent channel over one virtio-serial port.
 *
 * These hosts have no vhost-vsock, so the host reaches the guest agent through a single
 * virtio-serial port. The host opens one channel per agent operation (as it opens one unix
 * connection per operation to a container's agent); vmux turns each channel into a connection
 * to the agent's unix socket inside the guest.
 *
 * Frames, both ways: u32 channel, u8 type, u32 length (big-endian), then `length` bytes.
 *   OPEN  (1) host -> guest: connect this channel to the agent
 *   DATA  (2) either way: bytes of the channel
 *   CLOSE (3) either way: the channel is done (no half-close: the agent protocol has none)
 *   RESET (4) host -> guest, channel 0: the host (re)connected; every channel is dropped
 *   CLONE (5) host -> guest: a warm clone's identity, NUL-separated fields HOSTNAME EPOCH_NS
 *             HEX [MAC ADDRESS GATEWAY GATEWAY_MAC], applied by vmux itself (no process to
 *             start: under TCG a clone's first fork and exec cost ~100 ms); the guest answers
 *             CLONE on the same channel with "0", or "1 " and what failed.
 *
 * Flow control is coarse: while more than LIMIT bytes wait for the agent, vmux stops reading
 * the port; while more than LIMIT bytes wait for the port, it stops reading connections. Memory
 * stays bounded; a stalled channel can delay the others (documented in docs/microvm.md).
 *
 * Usage: corral-vmux PORT_DEVICE AGENT_SOCKET
 *        corral-vmux --boot ENV_FILE HOSTNAME PORT_DEVICE AGENT_SOCKET -- AGENT ARGS...
 *        corral-vmux --clone HOSTNAME EPOCH_NS HEX [MAC ADDRESS GATEWAY GATEWAY_MAC]
 *            (a warm clone's name, clock, entropy and network)
 * The second form is the guest's pid 1 after switch_root: it sets the host name, forks the mux
 * (which waits for the agent's socket), and becomes the agent with the environment in ENV_FILE
 * (NUL-separated KEY=VALUE entries, as the host wrote them), so the agent is the guest's init
 * exactly as it is a container's.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { F_OPEN = 1, F_DATA = 2, F_CLOSE = 3, F_RESET = 4, F_CLONE = 5 };
enum { HDR = 9, MAX_CH = 1024, MAX_PAYLOAD = 1 << 20, LIMIT = 4 << 20, CHUNK = 64 << 10 };

struct buf {
    uint8_t *p;
    size_t len, cap;
};

struct chan {
    uint32_t id;
    int fd;        /* -1: slot free */
    struct buf out; /* waiting for the agent */
};

static struct chan g_ch[MAX_CH];
static struct buf g_in, g_port_out;
static int g_port = -1;
static const char *g_sock;
static size_t g_to_agent;

__attribute__((noreturn)) static void die(const char *what) {
    fprintf(stderr, "corral-vmux: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void buf_add(struct buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) die("realloc");
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_drop(struct buf *b, size_t n) {
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void frame(uint32_t ch, uint8_t type, const void *data, size_t n) {
    uint8_t h[HDR];
    put32(h, ch);
    h[4] = type;
    put32(h + 5, (uint32_t)n);
    buf_add(&g_port_out, h, HDR);
    if (n) buf_add(&g_port_out, data, n);
}

static struct chan *find(uint32_t id) {
    for (int i = 0; i < MAX_CH; i++)
        if (g_ch[i].fd >= 0 && g_ch[i].id == id) return &g_ch[i];
    return NULL;
}

static void drop(struct chan *c, int tell_host) {
    if (tell_host) frame(c->id, F_CLOSE, NULL, 0);
    close(c->fd);
    c->fd = -1;
    g_to_agent -= c->out.len;
    c->out.len = 0;
}

static void drop_all(void) {
    for (int i = 0; i < MAX_CH; i++)
        if (g_ch[i].fd >= 0) drop(&g_ch[i], 0);
    g_port_out.len = 0;
}

static void open_chan(uint32_t id) {
    struct chan *slot = NULL;
    if (find(id)) return; /* a repeated OPEN changes nothing */
    for (int i = 0; i < MAX_CH && !slot; i++)
        if (g_ch[i].fd < 0) slot = &g_ch[i];
    int fd = slot ? socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) : -1;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, g_sock, sizeof sa.sun_path - 1);
    /* A blocking connect to a local listener returns at once; the agent may still be starting,
     * in which case the host sees CLOSE and retries. */
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (fd >= 0) close(fd);
        frame(id, F_CLOSE, NULL, 0);
        return;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    slot->id = id;
    slot->fd = fd;
    slot->out.len = 0;
}

static int clone_setup(int argc, char **argv, char *why, size_t whylen);

/* CLONE: split the payload into fields and answer with the outcome on the same channel. */
static void on_clone(uint32_t id, const uint8_t *data, uint32_t n) {
    char *copy = malloc((size_t)n + 1), *fields[8], why[256] = "";
    int count = 0;
    if (!copy) die("malloc");
    memcpy(copy, data, n);
    copy[n] = 0;
    for (uint32_t at = 0; at < n && count < 8; at += (uint32_t)strlen(copy + at) + 1)
        fields[count++] = copy + at;
    char reply[300];
    int rc = (count == 3 || count == 7) ? clone_setup(count, fields, why, sizeof why) : -1;
    if (count != 3 && count != 7) snprintf(why, sizeof why, "%d fields", count);
    int len = rc == 0 ? snprintf(reply, sizeof reply, "0") : snprintf(reply, sizeof reply, "1 %s", why);
    frame(id, F_CLONE, reply, (size_t)len);
    free(copy);
}

static void on_frame(uint32_t id, uint8_t type, const uint8_t *data, uint32_t n) {
    struct chan *c;
    switch (type) {
    case F_CLONE: on_clone(id, data, n); break;
    case F_RESET: drop_all(); break;
    case F_OPEN: open_chan(id); break;
    case F_DATA:
        if ((c = find(id)) != NULL) {
            buf_add(&c->out, data, n);
            g_to_agent += n;
        }
        break;
    case F_CLOSE:
        if ((c = find(id)) != NULL) drop(c, 0);
        break;
    default: break; /* unknown types are ignored: newer hosts may send more */
    }
}

static void read_port(void) {
    uint8_t tmp[CHUNK];
    ssize_t n = read(g_port, tmp, sizeof tmp);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        /* The host end is not connected: nothing can be delivered; wait for it. */
        drop_all();
        g_in.len = 0;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
        return;
    }
    if (n < 0) return;
    buf_add(&g_in, tmp, (size_t)n);
    size_t off = 0;
    while (g_in.len - off >= HDR) {
        uint32_t len = get32(g_in.p + off + 5);
        if (len > MAX_PAYLOAD) { /* garbage: resynchronise by dropping everything */
            drop_all();
            g_in.len = 0;
            return;
        }
        if (g_in.len - off < HDR + len) break;
        on_frame(get32(g_in.p + off), g_in.p[off + 4], g_in.p + off + HDR, len);
        off += HDR + len;
    }
    buf_drop(&g_in, off);
}

static void flush_port(void) {
    while (g_port_out.len) {
        ssize_t n = write(g_port, g_port_out.p, g_port_out.len);
        if (n <= 0) return;
        buf_drop(&g_port_out, (size_t)n);
    }
}

static void on_chan(struct chan *c, short re) {
    if (re & POLLOUT) {
        while (c->out.len) {
            ssize_t n = write(c->fd, c->out.p, c->out.len);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                drop(c, 1);
                return;
            }
            buf_drop(&c->out, (size_t)n);
            g_to_agent -= (size_t)n;
        }
    }
    if (re & (POLLIN | POLLHUP | POLLERR)) {
        uint8_t tmp[CHUNK];
        ssize_t n = read(c->fd, tmp, sizeof tmp);
        if (n > 0) {
            frame(c->id, F_DATA, tmp, (size_t)n);
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            drop(c, 1);
        }
    }
}

static char **read_env(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct buf b = {0};
    if (fd >= 0) {
        uint8_t tmp[CHUNK];
        ssize_t n;
        while ((n = read(fd, tmp, sizeof tmp)) > 0) buf_add(&b, tmp, (size_t)n);
        close(fd);
    }
    uint8_t nul = 0;
    buf_add(&b, &nul, 1);
    size_t count = 0;
    for (size_t i = 0; i + 1 < b.len; i++)
        if (b.p[i] == 0) count++;
    char **env = calloc(count + 2, sizeof *env);
    if (!env) die("calloc");
    size_t k = 0;
    for (size_t i = 0; i + 1 < b.len && k <= count;) {
        char *entry = (char *)b.p + i;
        size_t len = strlen(entry);
        if (len && strchr(entry, '=')) env[k++] = entry;
        i += len + 1;
    }
    env[k] = NULL;
    return env;
}

static int mux(const char *port, const char *sock);

static int parse_mac(const char *text, unsigned char out[6]) {
    unsigned v[6];
    if (sscanf(text, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) out[i] = (unsigned char)v[i];
    return 0;
}

/* What failed in a clone's setup (errno appended), for the host's error message. */
static char *g_why;
static size_t g_whylen;
#define TRY(ok, what)                                                                 \
    do {                                                                              \
        if (!(ok)) {                                                                  \
            snprintf(g_why, g_whylen, "%s: %s", (what), strerror(errno ? errno : EINVAL)); \
            goto fail;                                                                \
        }                                                                             \
    } while (0)

static int set_in(struct sockaddr *sa, const char *ip) {
    struct sockaddr_in *in = (struct sockaddr_in *)sa;
    memset(in, 0, sizeof *in);
    in->sin_family = AF_INET;
    errno = EINVAL;
    return inet_pton(AF_INET, ip, &in->sin_addr) == 1 ? 0 : -1;
}

/* A clone's network, as the cold boot's init sets it with busybox: eth0 with the sandbox's MAC
 * and /32, a host route to the gateway, the default route through it, and the gateway's MAC
 * fixed. Plain ioctls: under TCG each forked tool costs ~20 ms. */
static int net_config(const char *mac, const char *addr, const char *gw, const char *gwmac) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    TRY(s >= 0, "socket");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, "eth0", IFNAMSIZ - 1);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    errno = EINVAL;
    TRY(parse_mac(mac, (unsigned char *)ifr.ifr_hwaddr.sa_data) == 0, mac);
    /* virtio-net changes its MAC while up (the template left the link up); a NIC that cannot
     * goes down for it. */
    if (ioctl(s, SIOCSIFHWADDR, &ifr) != 0) {
        struct ifreq flags = ifr;
        TRY(errno == EBUSY && ioctl(s, SIOCGIFFLAGS, &flags) == 0, "eth0 address");
        flags.ifr_flags &= ~IFF_UP;
        TRY(ioctl(s, SIOCSIFFLAGS, &flags) == 0, "eth0 down");
        TRY(ioctl(s, SIOCSIFHWADDR, &ifr) == 0, "eth0 address");
    }
    TRY(set_in(&ifr.ifr_addr, addr) == 0, addr);
    TRY(ioctl(s, SIOCSIFADDR, &ifr) == 0, "eth0 ip");
    TRY(set_in(&ifr.ifr_netmask, "255.255.255.255") == 0, "netmask");
    TRY(ioctl(s, SIOCSIFNETMASK, &ifr) == 0, "eth0 netmask");
    TRY(ioctl(s, SIOCGIFFLAGS, &ifr) == 0, "eth0");
    if (!(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        TRY(ioctl(s, SIOCSIFFLAGS, &ifr) == 0, "eth0 up");
    }
    char dev[] = "eth0";
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    TRY(set_in(&rt.rt_dst, gw) == 0, gw);
    TRY(set_in(&rt.rt_genmask, "255.255.255.255") == 0, "netmask");
    rt.rt_flags = RTF_UP | RTF_HOST;
    rt.rt_dev = dev;
    TRY(ioctl(s, SIOCADDRT, &rt) == 0 || errno == EEXIST, "route to the gateway");
    memset(&rt, 0, sizeof rt);
    TRY(set_in(&rt.rt_dst, "0.0.0.0") == 0 && set_in(&rt.rt_genmask, "0.0.0.0") == 0, "route");
    TRY(set_in(&rt.rt_gateway, gw) == 0, gw);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = dev;
    TRY(ioctl(s, SIOCADDRT, &rt) == 0 || errno == EEXIST, "default route");
    struct arpreq arp;
    memset(&arp, 0, sizeof arp);
    TRY(set_in(&arp.arp_pa, gw) == 0, gw);
    arp.arp_ha.sa_family = ARPHRD_ETHER;
    errno = EINVAL;
    TRY(parse_mac(gwmac, (unsigned char *)arp.arp_ha.sa_data) == 0, gwmac);
    arp.arp_flags = ATF_PERM | ATF_COM;
    strncpy(arp.arp_dev, "eth0", sizeof arp.arp_dev - 1);
    TRY(ioctl(s, SIOCSARP, &arp) == 0, "gateway neighbour");
    close(s);
    int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd >= 0) {
        dprintf(fd, "nameserver %s\n", gw);
        close(fd);
    }
    return 0;
fail:
    if (s >= 0) close(s);
    return -1;
}

/* Every clone of a warm template starts from the template's RNG state: writing to /dev/urandom
 * only mixes into the input pool, so the output stays the same until the kernel reseeds. The
 * host's fresh bytes are added with credit and the CRNG is reseeded at once. */
static int reseed(const char *hex) {
    struct {
        int entropy_count, buf_size;
        uint8_t buf[256];
    } info = {0};
    int fd = -1;
    size_t n = strlen(hex) / 2;
    errno = EINVAL;
    TRY(n > 0 && n <= sizeof info.buf, "entropy length");
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        errno = EINVAL;
        TRY(sscanf(hex + 2 * i, "%2x", &v) == 1, "entropy hex");
        info.buf[i] = (uint8_t)v;
    }
    info.buf_size = (int)n;
    info.entropy_count = (int)n * 8;
    fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    TRY(fd >= 0, "/dev/urandom");
    TRY(ioctl(fd, RNDADDENTROPY, &info) == 0, "RNDADDENTROPY");
    TRY(ioctl(fd, RNDRESEEDCRNG) == 0, "RNDRESEEDCRNG");
    close(fd);
    return 0;
fail:
    if (fd >= 0) close(fd);
    return -1;
}

/* A clone of a warm template (or of a snapshot): its own network, name, the host's clock and
 * fresh entropy. argv: HOSTNAME EPOCH_NS HEX [MAC ADDRESS GATEWAY GATEWAY_MAC]. */
static int clone_setup(int argc, char **argv, char *why, size_t whylen) {
    g_why = why;
    g_whylen = whylen;
    if (argc == 7 && net_config(argv[3], argv[4], argv[5], argv[6]) < 0) return -1;
    TRY(sethostname(argv[0], strlen(argv[0])) == 0, "sethostname");
    long long ns = atoll(argv[1]);
    struct timespec now = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    TRY(clock_settime(CLOCK_REALTIME, &now) == 0, "clock_settime");
    return reseed(argv[2]);
fail:
    return -1;
}

int main(int argc, char **argv) {
    if (argc >= 8 && strcmp(argv[1], "--boot") == 0 && strcmp(argv[6], "--") == 0) {
        char **env = read_env(argv[2]);
        if (sethostname(argv[3], strlen(argv[3])) < 0) perror("corral-vmux: sethostname");
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) return mux(argv[4], argv[5]);
        execve(argv[7], argv + 7, env);
        die(argv[7]);
    }
    if ((argc == 5 || argc == 9) && strcmp(argv[1], "--clone") == 0) {
        char why[256];
        if (clone_setup(argc - 2, argv + 2, why, sizeof why) == 0) return 0;
        fprintf(stderr, "corral-vmux: %s\n", why);
        return 1;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: corral-vmux PORT_DEVICE AGENT_SOCKET\n");
        return 2;
    }
    return mux(argv[1], argv[2]);
}

static int mux(const char *port, const char *sock) {
    g_sock = sock;
    for (int i = 0; i < MAX_CH; i++) g_ch[i].fd = -1;
    g_port = open(port, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (g_port < 0) die(port);
    static struct pollfd pfd[MAX_CH + 1];
    static struct chan *who[MAX_CH + 1];
    for (;;) {
        int n = 0;
        pfd[n] = (struct pollfd){.fd = g_port, .events = 0};
        if (g_to_agent < LIMIT) pfd[n].events |= POLLIN;
        if (g_port_out.len) pfd[n].events |= POLLOUT;
        who[n++] = NULL;
        for (int i = 0; i < MAX_CH; i++) {
            struct chan *c = &g_ch[i];
            if (c->fd < 0) continue;
            short ev = c->out.len ? POLLOUT : 0;
            if (g_port_out.len < LIMIT) ev |= POLLIN;
            pfd[n] = (struct pollfd){.fd = c->fd, .events = ev};
            who[n++] = c;
        }
        if (poll(pfd, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) read_port();
        for (int i = 1; i < n; i++)
            if (pfd[i].revents && who[i]->fd == pfd[i].fd) on_chan(who[i], pfd[i].revents);
        flush_port();
    }
}
