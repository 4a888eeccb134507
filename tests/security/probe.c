/* Escape probes run INSIDE a sandbox (built with gcc -static by tests/security fixtures).
 *
 * Each subcommand tries something the sandbox must not be able to do, or must still be able to
 * do, and prints one "name result errno" line per attempt so the test can assert on every
 * single one. It never decides pass/fail itself.
 *
 *   probe syscalls            forbidden syscalls, called directly (no libc wrappers)
 *   probe allowed             ordinary things that must keep working
 *   probe open PATH MODE      open(2) with r|w|rw, prints the errno
 *   probe forkbomb            fork until the kernel refuses, print count and errno
 *   probe membomb MB          allocate and touch MB megabytes
 *   probe fill PATH           write zeros to PATH until an error
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef AF_ALG
#define AF_ALG 38
#endif
#ifndef AF_PACKET
#define AF_PACKET 17
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif
#ifndef SYS_fsopen
#define SYS_fsopen 430
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif

static void report(const char *name, long ret) {
    /* ret < 0 means the call failed; errno says why. */
    printf("%s %s %d\n", name, ret < 0 ? "fail" : "ok", ret < 0 ? errno : 0);
    fflush(stdout);
}

/* For calls that create a child on success: the child leaves at once. */
static void report_child(const char *name, long ret) {
    if (ret == 0) _exit(0);
    if (ret > 0) waitpid((pid_t)ret, NULL, 0);
    report(name, ret);
}

static int syscalls(void) {
    errno = 0;
    report("mount", syscall(SYS_mount, "none", "/mnt", "tmpfs", 0, NULL));
    report("mount_proc", syscall(SYS_mount, "proc", "/mnt", "proc", 0, NULL));
    report("mount_cgroup", syscall(SYS_mount, "cgroup", "/mnt", "cgroup", 0, "memory"));
    report("umount2", syscall(SYS_umount2, "/proc", 2 /* MNT_DETACH */));
    report("pivot_root", syscall(SYS_pivot_root, "/", "/"));
    report("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
    report("unshare_ns", syscall(SYS_unshare, CLONE_NEWNS));
    report("unshare_net", syscall(SYS_unshare, CLONE_NEWNET));
    report_child("clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0));
    report_child("clone_newns", syscall(SYS_clone, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0));
    {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_NEWUSER;
        args.exit_signal = SIGCHLD;
        report_child("clone3", syscall(SYS_clone3, &args, sizeof args));
    }
    {
        int fd = open("/proc/self/ns/net", O_RDONLY);
        report("setns", syscall(SYS_setns, fd, 0));
        if (fd >= 0) close(fd);
    }
    report("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0));
    report("add_key", syscall(SYS_add_key, "user", "probe", "x", 1, -3));
    report("request_key", syscall(SYS_request_key, "user", "probe", NULL, -3));
    report("bpf", syscall(SYS_bpf, 0, NULL, 0));
    {
        char attr[128];
        memset(attr, 0, sizeof attr);
        report("perf_event_open", syscall(SYS_perf_event_open, attr, 0, -1, -1, 0));
    }
    {
        char params[120];
        memset(params, 0, sizeof params);
        report("io_uring_setup", syscall(SYS_io_uring_setup, 1, params));
    }
    report("userfaultfd", syscall(SYS_userfaultfd, 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("finit_module", syscall(SYS_finit_module, 0, "", 0));
    report("delete_module", syscall(SYS_delete_module, "loop", 0));
    {
        char handle[64];
        memset(handle, 0, sizeof handle);
        report("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, handle, O_RDONLY));
    }
    report("socket_alg", syscall(SYS_socket, AF_ALG, SOCK_SEQPACKET, 0));
    report("socket_packet", syscall(SYS_socket, AF_PACKET, SOCK_RAW, 0));
    report("socket_packet_dgram", syscall(SYS_socket, AF_PACKET, SOCK_DGRAM, 0));
    report("socket_raw_inet", syscall(SYS_socket, AF_INET, SOCK_RAW, 1));
    report("socket_vsock", syscall(SYS_socket, 40, SOCK_STREAM, 0));
    report("fsopen", syscall(SYS_fsopen, "tmpfs", 0));
    report("open_tree", syscall(SYS_open_tree, AT_FDCWD, "/", 1));
    report("move_mount", syscall(SYS_move_mount, -1, "", AT_FDCWD, "/mnt", 0));
    report("mount_setattr", syscall(SYS_mount_setattr, AT_FDCWD, "/", 0, NULL, 0));
    report("sethostname", syscall(SYS_sethostname, "evil", 4));
    report("reboot", syscall(SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc, NULL));
    report("swapon", syscall(SYS_swapon, "/x", 0));
    report("quotactl", syscall(SYS_quotactl, 0, NULL, 0, NULL));
    report("syslog", syscall(SYS_syslog, 3, NULL, 0));
    report("ptrace_host_pid1", syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, 1, 0, 0));
    return 0;
}

static int allowed(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    report("socket_inet", s);
    if (s >= 0) close(s);
    s = socket(AF_INET6, SOCK_DGRAM, 0);
    report("socket_inet6", s);
    if (s >= 0) close(s);
    s = socket(AF_UNIX, SOCK_STREAM, 0);
    report("socket_unix", s);
    if (s >= 0) close(s);
    s = socket(AF_NETLINK, SOCK_RAW, 0);
    report("socket_netlink", s);
    if (s >= 0) close(s);
    /* ping without CAP_NET_RAW uses ICMP datagram sockets */
    s = socket(AF_INET, SOCK_DGRAM, 1);
    printf("socket_icmp_dgram %s %d\n", s < 0 ? "fail" : "ok", s < 0 ? errno : 0);
    if (s >= 0) close(s);
    pid_t pid = fork();
    if (pid == 0) _exit(7);
    int status = 0;
    if (pid > 0) waitpid(pid, &status, 0);
    report("fork", pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 7 ? 0 : -1);
    pid = fork();
    if (pid == 0) {
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    if (pid > 0) waitpid(pid, &status, 0);
    report("exec", pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1);
    report("getpid", getpid());
    return 0;
}

static int try_open(const char *path, const char *mode) {
    int flags = strcmp(mode, "w") == 0 ? O_WRONLY : strcmp(mode, "rw") == 0 ? O_RDWR : O_RDONLY;
    int fd = open(path, flags);
    if (fd >= 0 && flags == O_RDONLY) {
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof buf);
        printf("read %zd\n", n);
    }
    report("open", fd);
    return 0;
}

#define MAX_BOMB 100000
static pid_t bomb[MAX_BOMB];

static int forkbomb(void) {
    long count = 0;
    int err = 0;
    while (count < MAX_BOMB) {
        pid_t pid = fork();
        if (pid == 0) {
            pause();
            _exit(0);
        }
        if (pid < 0) {
            err = errno;
            break;
        }
        bomb[count++] = pid;
    }
    printf("forked %ld %d\n", count, err);
    fflush(stdout);
    /* Only our own children: the agent (our parent) must survive the probe. */
    for (long i = 0; i < count; i++) kill(bomb[i], SIGKILL);
    for (long i = 0; i < count; i++) waitpid(bomb[i], NULL, 0);
    return 0;
}

static int membomb(long mb) {
    long done = 0;
    for (; done < mb; done++) {
        char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) break;
        memset(p, 1, 1 << 20);
    }
    printf("allocated %ld\n", done);
    return 0;
}

static int fill(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        report("fill_open", fd);
        return 0;
    }
    static char buf[1 << 20];
    long long total = 0;
    for (;;) {
        ssize_t n = write(fd, buf, sizeof buf);
        if (n < 0) {
            printf("fill fail %d %lld\n", errno, total);
            break;
        }
        total += n;
    }
    int r = fsync(fd);
    printf("fsync %s %d\n", r < 0 ? "fail" : "ok", r < 0 ? errno : 0);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "syscalls")) return syscalls();
    if (!strcmp(argv[1], "allowed")) return allowed();
    if (!strcmp(argv[1], "open") && argc == 4) return try_open(argv[2], argv[3]);
    if (!strcmp(argv[1], "forkbomb")) return forkbomb();
    if (!strcmp(argv[1], "membomb") && argc == 3) return membomb(atol(argv[2]));
    if (!strcmp(argv[1], "fill") && argc == 3) return fill(argv[2]);
    return 2;
}
