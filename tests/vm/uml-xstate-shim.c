/*
 * LD_PRELOAD shim for Debian's linux.uml (6.1) on hosts with a large XSAVE area
 * (AVX-512 / AMX, e.g. Sapphire Rapids).
 *
 * UML 6.1 saves and restores the FPU state of guest processes with
 * ptrace(PTRACE_{GET,SET}REGSET, NT_X86_XSTATE) using a fixed 832-byte buffer
 * (struct _xstate: legacy area + header + AVX). The host kernel accepts a short
 * GETREGSET, but refuses a SETREGSET whose size is not exactly its own XSAVE size
 * (-EFAULT), so the first guest process dies with
 *   "userspace - ptrace set fp regs failed, errno = 14"
 *   "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b".
 *
 * The shim keeps, for each buffer address UML uses (one per guest task), a full-size
 * shadow copy: a short GET reads the whole state into the shadow and hands UML its
 * first bytes; a short SET writes UML's bytes over the shadow and sets the whole
 * thing. So the state beyond 832 bytes (AVX-512) is preserved per guest task. If the
 * shadow is missing or belongs to another host process (a fresh task whose buffer UML
 * filled by copying), the state beyond the buffer is reset to its init state instead.
 * Calls with a buffer of the full size pass through untouched, so the shim is a no-op
 * on hosts where UML's buffer is big enough.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#define REQ_GETREGSET 0x4204
#define REQ_SETREGSET 0x4205
#define NT_XSTATE 0x202
#define XSTATE_HDR_OFF 512 /* xsave header: u64 xfeatures, u64 xcomp_bv, ... */
#define PROBE_SIZE (1 << 16)

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

struct shadow {
    void *key;
    pid_t pid;
    unsigned char *buf;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static ptrace_fn real_ptrace;
static size_t host_size; /* the host's XSAVE regset size, 0 = unknown */
static struct shadow *table;
static size_t table_cap, table_len;

static size_t hash_ptr(void *p, size_t cap)
{
    uintptr_t x = (uintptr_t)p;
    x ^= x >> 17;
    x *= 0x9E3779B97F4A7C15ull;
    return (size_t)(x >> 7) & (cap - 1);
}

static struct shadow *find(void *key, int create)
{
    if (table_cap == 0 || (create && (table_len + 1) * 2 > table_cap)) {
        size_t ncap = table_cap ? table_cap * 2 : 1024;
        struct shadow *nt = calloc(ncap, sizeof *nt);
        if (!nt)
            return NULL;
        for (size_t i = 0; i < table_cap; i++) {
            if (!table[i].key)
                continue;
            size_t h = hash_ptr(table[i].key, ncap);
            while (nt[h].key)
                h = (h + 1) & (ncap - 1);
            nt[h] = table[i];
        }
        free(table);
        table = nt;
        table_cap = ncap;
    }
    size_t h = hash_ptr(key, table_cap);
    while (table[h].key) {
        if (table[h].key == key)
            return &table[h];
        h = (h + 1) & (table_cap - 1);
    }
    if (!create)
        return NULL;
    unsigned char *buf = calloc(1, host_size);
    if (!buf)
        return NULL;
    table[h].key = key;
    table[h].pid = 0;
    table[h].buf = buf;
    table_len++;
    return &table[h];
}

static long call_real(int req, pid_t pid, void *addr, void *data)
{
    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    return real_ptrace(req, pid, addr, data);
}

/* Learn the host's XSAVE size from a GETREGSET with a big buffer. */
static int probe(pid_t pid)
{
    if (host_size)
        return 0;
    void *big = calloc(1, PROBE_SIZE);
    if (!big)
        return -1;
    struct iovec iov = { big, PROBE_SIZE };
    long r = call_real(REQ_GETREGSET, pid, (void *)(uintptr_t)NT_XSTATE, &iov);
    int e = errno;
    free(big);
    if (r < 0) {
        errno = e;
        return -1;
    }
    host_size = iov.iov_len;
    return 0;
}

long ptrace(int req, ...)
{
    va_list ap;
    va_start(ap, req);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);

    if ((req != REQ_GETREGSET && req != REQ_SETREGSET) || (uintptr_t)addr != NT_XSTATE || !data)
        return call_real(req, pid, addr, data);

    struct iovec *uiov = data;
    long ret;
    pthread_mutex_lock(&lock);
    if (probe(pid) < 0 || uiov->iov_len >= host_size || uiov->iov_len <= XSTATE_HDR_OFF + 16) {
        pthread_mutex_unlock(&lock);
        return call_real(req, pid, addr, data);
    }
    size_t n = uiov->iov_len;
    if (req == REQ_GETREGSET) {
        struct shadow *s = find(uiov->iov_base, 1);
        if (!s) {
            pthread_mutex_unlock(&lock);
            return call_real(req, pid, addr, data);
        }
        struct iovec iov = { s->buf, host_size };
        ret = call_real(REQ_GETREGSET, pid, addr, &iov);
        if (ret >= 0) {
            s->pid = pid;
            memcpy(uiov->iov_base, s->buf, n);
            uiov->iov_len = n < iov.iov_len ? n : iov.iov_len;
        } else {
            s->pid = 0;
        }
    } else {
        struct shadow *s = find(uiov->iov_base, 1);
        unsigned char *tmp = NULL, *full;
        if (s && s->pid == pid) {
            full = s->buf;
        } else {
            tmp = calloc(1, host_size);
            if (!tmp) {
                pthread_mutex_unlock(&lock);
                errno = ENOMEM;
                return -1;
            }
            full = tmp;
        }
        memcpy(full, uiov->iov_base, n);
        if (full == tmp) {
            /* Nothing known beyond UML's buffer: keep only the components that fit
             * in it (x87, SSE, AVX); the others get their init state. */
            uint64_t xfeatures;
            memcpy(&xfeatures, full + XSTATE_HDR_OFF, sizeof xfeatures);
            xfeatures &= 0x7;
            memcpy(full + XSTATE_HDR_OFF, &xfeatures, sizeof xfeatures);
        }
        struct iovec iov = { full, host_size };
        ret = call_real(REQ_SETREGSET, pid, addr, &iov);
        int e = errno;
        if (tmp) {
            if (ret >= 0 && s) {
                memcpy(s->buf, tmp, host_size);
                s->pid = pid;
            }
            free(tmp);
        }
        errno = e;
    }
    pthread_mutex_unlock(&lock);
    return ret;
}
