/* corral-vmjail: start QEMU jailed (issue 5, hardening), like Firecracker's jailer.
 *
 *   corral-vmjail --uid U --gid G [--group G2]... --root DIR --pidfile FILE
 *                 [--ro PATH]... [--rw PATH]... [--dev PATH]... -- QEMU ARGV...
 *
 * In new mount, pid and IPC namespaces, a tmpfs at DIR becomes the root and receives, each at
 * its own absolute path, only what this VM needs: PATHs bound read-only (--ro: /usr, the
 * kernel, the template images), read-write (--rw: the VM's own directory and socket
 * directory) and device nodes (--dev: /dev/null, /dev/net/tun, /dev/kvm). /proc is the pid
 * namespace's own (QEMU alone). Then root is pivoted there, every capability is dropped with
 * the switch to the VM's own uid/gid, no_new_privs is set, and QEMU is executed as the
 * namespace's pid 1 with every descriptor but 0-2 and the inherited ones (its saved state,
 * the template memory) as it was given.
 *
 * The parent, still in the host's pid namespace, writes QEMU's host pid to FILE once the jail
 * is set up (or prints why it could not be) and exits; QEMU is then nobody's child but init's,
 * as with ``setsid --fork``.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_PATHS 64
#define MAX_GROUPS 8

struct bind {
    const char *path;
    int how; /* 'r' read-only, 'w' read-write, 'd' device */
};

static int report_fd = -1; /* child -> parent: why the jail failed (empty: exec'd) */

static void die(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg - 2, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n > (int)sizeof msg - 2) n = sizeof msg - 2;
    n += snprintf(msg + n, sizeof msg - n, ": %s\n", strerror(errno));
    if (report_fd >= 0) {
        (void)!write(report_fd, msg, (size_t)n);
    } else {
        (void)!write(2, msg, (size_t)n);
    }
    _exit(127);
}

/* mkdir -p of every parent of PATH (relative to the current directory, the new root). */
static void make_parents(const char *path) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        errno = ENAMETOOLONG;
        die("path %s", path);
    }
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("mkdir %s", buf);
        *p = '/';
    }
}

static void bind_into(const char *root, const struct bind *b) {
    char target[4096];
    struct stat st;
    if (lstat(b->path, &st) != 0) die("jail source %s", b->path);
    if (snprintf(target, sizeof target, "%s%s", root, b->path) >= (int)sizeof target) {
        errno = ENAMETOOLONG;
        die("jail target %s", b->path);
    }
    make_parents(target);
    if (S_ISLNK(st.st_mode)) {
        /* a merged-/usr host: /lib -> usr/lib and friends are copied as links */
        char dest[4096];
        ssize_t n = readlink(b->path, dest, sizeof dest - 1);
        if (n < 0) die("readlink %s", b->path);
        dest[n] = 0;
        if (symlink(dest, target) != 0 && errno != EEXIST) die("symlink %s", target);
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        if (mkdir(target, 0755) != 0 && errno != EEXIST) die("mkdir %s", target);
    } else {
        int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) die("create %s", target);
        close(fd);
    }
    if (mount(b->path, target, NULL, MS_BIND | MS_REC, NULL) != 0) die("bind %s", b->path);
    unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID;
    if (b->how == 'r') flags |= MS_RDONLY | MS_NODEV;
    if (b->how == 'w') flags |= MS_NODEV | MS_NOEXEC;
    if (b->how == 'd') flags |= MS_NOEXEC;
    if (mount(NULL, target, NULL, flags, NULL) != 0) die("remount %s", b->path);
}

static void jail(const char *root, struct bind *binds, int nbinds) {
    /* The mount namespace is the child's alone: pivot_root moves the root of every process
     * of a namespace, the parent's too if it shared it. */
    if (unshare(CLONE_NEWNS) != 0) die("unshare mount namespace");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("private /");
    if (mount("corral-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") != 0)
        die("tmpfs on %s", root);
    for (int i = 0; i < nbinds; i++) bind_into(root, &binds[i]);
    char proc[4096];
    snprintf(proc, sizeof proc, "%s/proc", root);
    if (mkdir(proc, 0555) != 0 && errno != EEXIST) die("mkdir %s", proc);
    if (mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2") != 0)
        die("proc");
    if (chdir(root) != 0) die("chdir %s", root);
    if (mkdir(".old", 0700) != 0) die("mkdir .old");
    if (syscall(SYS_pivot_root, ".", ".old") != 0) die("pivot_root");
    if (chdir("/") != 0) die("chdir /");
    if (umount2("/.old", MNT_DETACH) != 0) die("umount old root");
    if (rmdir("/.old") != 0) die("rmdir .old");
    /* Nothing more is ever mounted or created in the jail's root. */
    if (mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
        die("read-only root");
}

static void drop(uid_t uid, gid_t gid, gid_t *groups, int ngroups) {
    for (int cap = 0; cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) die("drop capability %d", cap);
    }
    if (setgroups((size_t)ngroups, groups) != 0) die("setgroups");
    if (setresgid(gid, gid, gid) != 0) die("setresgid");
    if (setresuid(uid, uid, uid) != 0) die("setresuid"); /* clears every capability */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs");
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) die("not dumpable");
}

static long number(const char *s, const char *what) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v <= 0) {
        fprintf(stderr, "corral-vmjail: bad %s %s\n", what, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    struct bind binds[MAX_PATHS];
    gid_t groups[MAX_GROUPS];
    int nbinds = 0, ngroups = 0, i;
    long uid = 0, gid = 0;
    const char *root = NULL, *pidfile = NULL;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            i++;
            break;
        }
        if (i + 1 >= argc) break;
        const char *v = argv[++i];
        if (!strcmp(a, "--uid")) uid = number(v, "uid");
        else if (!strcmp(a, "--gid")) gid = number(v, "gid");
        else if (!strcmp(a, "--group") && ngroups < MAX_GROUPS) groups[ngroups++] = (gid_t)number(v, "group");
        else if (!strcmp(a, "--root")) root = v;
        else if (!strcmp(a, "--pidfile")) pidfile = v;
        else if (nbinds < MAX_PATHS && (!strcmp(a, "--ro") || !strcmp(a, "--rw") || !strcmp(a, "--dev"))) {
            if (v[0] != '/') {
                fprintf(stderr, "corral-vmjail: %s must be absolute\n", v);
                return 2;
            }
            binds[nbinds].path = v;
            binds[nbinds++].how = !strcmp(a, "--ro") ? 'r' : !strcmp(a, "--rw") ? 'w' : 'd';
        } else {
            fprintf(stderr, "corral-vmjail: unknown or excess option %s\n", a);
            return 2;
        }
    }
    if (!uid || !gid || !root || !pidfile || i >= argc) {
        fprintf(stderr, "usage: corral-vmjail --uid U --gid G --root DIR --pidfile FILE "
                        "[--ro|--rw|--dev PATH]... -- QEMU ARGV...\n");
        return 2;
    }
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0) die("pipe");
    if (unshare(CLONE_NEWPID | CLONE_NEWIPC) != 0) die("unshare");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(pipefd[0]);
        report_fd = pipefd[1];
        if (prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0) != 0) die("pdeathsig");
        jail(root, binds, nbinds);
        drop((uid_t)uid, (gid_t)gid, groups, ngroups);
        execv(argv[i], &argv[i]);
        die("exec %s", argv[i]);
    }
    close(pipefd[1]);
    char why[1024];
    ssize_t n = read(pipefd[0], why, sizeof why - 1);
    if (n > 0) {
        why[n] = 0;
        fprintf(stderr, "corral-vmjail: %s", why);
        waitpid(child, NULL, 0);
        return 1;
    }
    /* exec'd (the pipe closed on exec): tell the host which pid QEMU is */
    char tmp[4096], line[32];
    snprintf(tmp, sizeof tmp, "%s.tmp", pidfile);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("pidfile %s", tmp);
    int len = snprintf(line, sizeof line, "%d\n", (int)child);
    if (write(fd, line, (size_t)len) != len || close(fd) != 0) die("pidfile %s", tmp);
    if (rename(tmp, pidfile) != 0) die("pidfile %s", pidfile);
    return 0;
}
