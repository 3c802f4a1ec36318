/*
 * lg: a small HTTP/1.1 load generator that speaks to forward proxies.
 *
 * Why this exists: wrk and h2load cannot use an HTTP proxy, ab cannot tunnel
 * https through CONNECT (it sends TLS straight at the proxy), and no Go
 * toolchain is reachable here. This is one blocking thread per connection:
 * at the concurrencies we use (16..64) that is cheap, simple to reason about,
 * and costs far less CPU than the Python proxy it is measuring (the harness
 * proves that by running it direct-to-origin first and reporting its CPU).
 *
 * Modes:
 *   http  : plain HTTP; via proxy uses absolute-URI request lines.
 *   https : via proxy sends CONNECT, then TLS (SNI = target host) in the tunnel.
 *   connect: via proxy sends CONNECT only and expects status -s (e.g. 403);
 *            measures how fast a proxy refuses a tunnel.
 * -k 1 reuses each connection (and each CONNECT tunnel) for every request;
 * -k 0 opens a new TCP connection (+ CONNECT + full TLS handshake) per request.
 *
 * Output: one JSON object on stdout.
 * Build: cc -O2 -pthread -o lg lg.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADERS 8
#define BUF_SIZE 65536

enum mode { MODE_HTTP, MODE_HTTPS, MODE_CONNECT };

typedef struct {
    const char *proxy;  /* host:port or NULL for direct */
    const char *addr;   /* host:port to TCP-connect to when direct */
    const char *target; /* host:port the request is for */
    const char *path;
    enum mode mode;
    int concurrency;
    double duration;
    int keepalive;
    int expect_status;
    const char *headers[MAX_HEADERS]; /* extra header lines, sent to the proxy */
    int n_headers;
} config_t;

typedef struct {
    int fd;
    SSL *ssl;
    char buf[BUF_SIZE];
    size_t len, off; /* unread bytes are buf[off..len) */
} conn_t;

typedef struct {
    uint64_t *lat; /* per-request latency in ns */
    size_t n, cap;
    uint64_t errors_connect, errors_status, errors_io;
    uint64_t bytes;
    uint64_t last_done_ns;
    pthread_t tid;
} worker_t;

static config_t cfg;
static SSL_CTX *ssl_ctx;
static struct sockaddr_in first_hop; /* proxy, or origin when direct */
static char target_host[256];
static char request[4096];
static size_t request_len;
static char connect_req[2048];
static size_t connect_req_len;
static uint64_t start_ns, deadline_ns;
static atomic_int ready_count;
static atomic_int go;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "lg: %s\n", msg);
    exit(2);
}

/* Resolve "host:port" numerically or via getaddrinfo (only used for 127.0.0.1). */
static void parse_hostport(const char *hp, struct sockaddr_in *out) {
    char host[256];
    const char *colon = strrchr(hp, ':');
    if (!colon || (size_t)(colon - hp) >= sizeof host) die("bad host:port");
    memcpy(host, hp, (size_t)(colon - hp));
    host[colon - hp] = 0;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, colon + 1, &hints, &res) != 0) die("cannot resolve address");
    memcpy(out, res->ai_addr, sizeof *out);
    freeaddrinfo(res);
}

static void conn_close(conn_t *c) {
    if (c->ssl) {
        SSL_free(c->ssl); /* no close_notify: a keep-alive client that just goes away */
        c->ssl = NULL;
    }
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->len = c->off = 0;
}

static int raw_write(conn_t *c, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = c->ssl ? SSL_write(c->ssl, p, (int)n) : send(c->fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) {
            if (!c->ssl && w < 0 && errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Refill the buffer; returns bytes read, 0 on EOF, -1 on error. */
static ssize_t fill(conn_t *c) {
    if (c->off == c->len) c->off = c->len = 0;
    if (c->len == BUF_SIZE) {
        memmove(c->buf, c->buf + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
        if (c->len == BUF_SIZE) return -1; /* header larger than buffer */
    }
    ssize_t r;
    do {
        r = c->ssl ? SSL_read(c->ssl, c->buf + c->len, (int)(BUF_SIZE - c->len))
                   : recv(c->fd, c->buf + c->len, BUF_SIZE - c->len, 0);
    } while (!c->ssl && r < 0 && errno == EINTR);
    if (r < 0) return -1;
    c->len += (size_t)r;
    return r;
}

/* Read a line (without CRLF) into out; returns 0 ok, -1 error. */
static int read_line(conn_t *c, char *out, size_t cap) {
    for (;;) {
        char *nl = memchr(c->buf + c->off, '\n', c->len - c->off);
        if (nl) {
            size_t n = (size_t)(nl - (c->buf + c->off));
            size_t copy = n < cap - 1 ? n : cap - 1;
            memcpy(out, c->buf + c->off, copy);
            if (copy > 0 && out[copy - 1] == '\r') copy--;
            out[copy] = 0;
            c->off += n + 1;
            return 0;
        }
        if (fill(c) <= 0) return -1;
    }
}

/* Discard exactly n body bytes. */
static int skip_bytes(conn_t *c, uint64_t n, uint64_t *counted) {
    while (n > 0) {
        if (c->off == c->len && fill(c) <= 0) return -1;
        size_t avail = c->len - c->off;
        size_t take = avail < n ? avail : (size_t)n;
        c->off += take;
        n -= take;
        *counted += take;
    }
    return 0;
}

typedef struct {
    int status;
    int64_t content_length; /* -1 when absent */
    int chunked;
    int close;
} head_t;

static int read_head(conn_t *c, head_t *h) {
    char line[8192];
    memset(h, 0, sizeof *h);
    h->content_length = -1;
    if (read_line(c, line, sizeof line) < 0) return -1;
    if (strncmp(line, "HTTP/1.", 7) != 0 || strlen(line) < 12) return -1;
    h->status = atoi(line + 9);
    if (line[7] == '0') h->close = 1; /* HTTP/1.0 defaults to close */
    for (;;) {
        if (read_line(c, line, sizeof line) < 0) return -1;
        if (line[0] == 0) return 0;
        if (strncasecmp(line, "content-length:", 15) == 0)
            h->content_length = strtoll(line + 15, NULL, 10);
        else if (strncasecmp(line, "transfer-encoding:", 18) == 0 && strcasestr(line, "chunked"))
            h->chunked = 1;
        else if (strncasecmp(line, "connection:", 11) == 0 && strcasestr(line, "close"))
            h->close = 1;
    }
}

static int read_body(conn_t *c, const head_t *h, int no_body, uint64_t *bytes) {
    if (no_body) return 0;
    if (h->chunked) {
        char line[256];
        for (;;) {
            if (read_line(c, line, sizeof line) < 0) return -1;
            uint64_t n = strtoull(line, NULL, 16);
            if (n == 0) { /* trailers end with an empty line */
                do {
                    if (read_line(c, line, sizeof line) < 0) return -1;
                } while (line[0]);
                return 0;
            }
            if (skip_bytes(c, n, bytes) < 0 || read_line(c, line, sizeof line) < 0) return -1;
        }
    }
    if (h->content_length >= 0) return skip_bytes(c, (uint64_t)h->content_length, bytes);
    /* No length: body runs to EOF. */
    for (;;) {
        *bytes += c->len - c->off;
        c->off = c->len;
        ssize_t r = fill(c);
        if (r == 0) return 0;
        if (r < 0) return -1;
    }
}

static int tcp_connect(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* A stalled proxy must not hang the benchmark: fail the request instead. */
    struct timeval tv = {.tv_sec = 10};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(c->fd, (struct sockaddr *)&first_hop, sizeof first_hop) < 0) return -1;
    return 0;
}

/* Send CONNECT and read the proxy's answer; returns the status or -1. */
static int send_connect(conn_t *c) {
    head_t h;
    uint64_t ignored = 0;
    if (raw_write(c, connect_req, connect_req_len) < 0 || read_head(c, &h) < 0) return -1;
    if (h.status != 200 && read_body(c, &h, 0, &ignored) < 0) return -1;
    return h.status;
}

/* Open a ready-to-use connection (TCP, CONNECT tunnel, TLS as configured). */
static int open_conn(conn_t *c, worker_t *w) {
    if (tcp_connect(c) < 0) {
        w->errors_connect++;
        return -1;
    }
    if (cfg.mode == MODE_HTTPS && cfg.proxy) {
        int st = send_connect(c);
        if (st != 200) {
            if (st < 0) w->errors_io++; else w->errors_status++;
            return -1;
        }
    }
    if (cfg.mode == MODE_HTTPS) {
        c->ssl = SSL_new(ssl_ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_tlsext_host_name(c->ssl, target_host);
        /* Bytes already buffered after the CONNECT reply would belong to TLS;
           proxies never send them before our ClientHello, so the buffer is empty. */
        c->len = c->off = 0;
        if (SSL_connect(c->ssl) != 1) {
            w->errors_connect++;
            return -1;
        }
    }
    return 0;
}

static void record(worker_t *w, uint64_t t0) {
    uint64_t t1 = now_ns();
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 65536;
        w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
        if (!w->lat) die("out of memory");
    }
    w->lat[w->n++] = t1 - t0;
    w->last_done_ns = t1;
}

/* One CONNECT that the proxy is expected to refuse (or accept) with cfg.expect_status. */
static void one_connect_probe(worker_t *w) {
    conn_t *c = calloc(1, sizeof *c);
    c->fd = -1;
    uint64_t t0 = now_ns();
    if (tcp_connect(c) < 0) {
        w->errors_connect++;
    } else {
        int st = send_connect(c);
        if (st < 0) w->errors_io++;
        else if (st != cfg.expect_status) w->errors_status++;
        else record(w, t0);
    }
    conn_close(c);
    free(c);
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    conn_t *c = calloc(1, sizeof *c);
    c->fd = -1;
    atomic_fetch_add(&ready_count, 1);
    while (!atomic_load(&go)) usleep(100);
    while (now_ns() < deadline_ns) {
        if (cfg.mode == MODE_CONNECT) {
            one_connect_probe(w);
            continue;
        }
        uint64_t t0 = now_ns();
        int ok = 0;
        if (c->fd >= 0 || open_conn(c, w) == 0) {
            head_t h;
            if (raw_write(c, request, request_len) < 0 || read_head(c, &h) < 0 ||
                read_body(c, &h, 0, &w->bytes) < 0) {
                w->errors_io++;
            } else if (h.status != cfg.expect_status) {
                w->errors_status++;
                if (h.close) conn_close(c);
            } else {
                ok = 1;
                if (h.close || !cfg.keepalive) conn_close(c);
            }
        }
        if (ok) {
            record(w, t0);
        } else {
            conn_close(c);
            usleep(1000); /* don't spin on a refusing proxy */
        }
    }
    conn_close(c);
    free(c);
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_ms(const uint64_t *v, size_t n, double p) {
    if (n == 0) return 0.0;
    size_t idx = (size_t)(p * (double)(n - 1) + 0.5); /* nearest rank */
    return (double)v[idx] / 1e6;
}

static void build_requests(void) {
    char extra[2048] = "";
    for (int i = 0; i < cfg.n_headers; i++) {
        strncat(extra, cfg.headers[i], sizeof extra - strlen(extra) - 3);
        strcat(extra, "\r\n");
    }
    const char *conn_hdr = cfg.keepalive ? "" : "Connection: close\r\n";
    if (cfg.mode == MODE_HTTP && cfg.proxy) {
        /* Absolute-URI request line, proxy credentials on every request. */
        request_len = (size_t)snprintf(request, sizeof request,
                                       "GET http://%s%s HTTP/1.1\r\nHost: %s\r\n%s%s"
                                       "User-Agent: warden-bench-lg\r\n\r\n",
                                       cfg.target, cfg.path, cfg.target, extra, conn_hdr);
    } else {
        /* Direct, or inside a CONNECT tunnel: origin-form, no proxy headers. */
        request_len = (size_t)snprintf(request, sizeof request,
                                       "GET %s HTTP/1.1\r\nHost: %s\r\n%s"
                                       "User-Agent: warden-bench-lg\r\n\r\n",
                                       cfg.path, cfg.target, conn_hdr);
    }
    connect_req_len = (size_t)snprintf(connect_req, sizeof connect_req,
                                       "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s"
                                       "User-Agent: warden-bench-lg\r\n\r\n",
                                       cfg.target, cfg.target, extra);
}

static void usage(void) {
    fprintf(stderr,
            "usage: lg -m http|https|connect -t target_host:port [-P proxy_host:port | -a addr:port]\n"
            "          [-p /path] [-c conc] [-d seconds] [-k 0|1] [-s expect_status] [-H 'Name: v']...\n");
    exit(2);
}

int main(int argc, char **argv) {
    cfg.path = "/";
    cfg.concurrency = 16;
    cfg.duration = 5;
    cfg.keepalive = 1;
    cfg.expect_status = 200;
    int opt;
    while ((opt = getopt(argc, argv, "m:t:P:a:p:c:d:k:s:H:")) != -1) {
        switch (opt) {
        case 'm':
            if (!strcmp(optarg, "http")) cfg.mode = MODE_HTTP;
            else if (!strcmp(optarg, "https")) cfg.mode = MODE_HTTPS;
            else if (!strcmp(optarg, "connect")) cfg.mode = MODE_CONNECT;
            else usage();
            break;
        case 't': cfg.target = optarg; break;
        case 'P': cfg.proxy = optarg; break;
        case 'a': cfg.addr = optarg; break;
        case 'p': cfg.path = optarg; break;
        case 'c': cfg.concurrency = atoi(optarg); break;
        case 'd': cfg.duration = atof(optarg); break;
        case 'k': cfg.keepalive = atoi(optarg); break;
        case 's': cfg.expect_status = atoi(optarg); break;
        case 'H':
            if (cfg.n_headers == MAX_HEADERS) die("too many -H");
            cfg.headers[cfg.n_headers++] = optarg;
            break;
        default: usage();
        }
    }
    if (!cfg.target || cfg.concurrency < 1 || (!cfg.proxy && !cfg.addr)) usage();
    if (cfg.mode == MODE_CONNECT && !cfg.proxy) die("connect mode needs -P");
    const char *colon = strrchr(cfg.target, ':');
    if (!colon || (size_t)(colon - cfg.target) >= sizeof target_host) die("target must be host:port");
    memcpy(target_host, cfg.target, (size_t)(colon - cfg.target));
    parse_hostport(cfg.proxy ? cfg.proxy : cfg.addr, &first_hop);
    build_requests();

    ssl_ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, NULL); /* the harness checks certificates separately */
    /* Like a fresh client process per connection: no session resumption. */
    SSL_CTX_set_session_cache_mode(ssl_ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ssl_ctx, SSL_OP_NO_TICKET);

    worker_t *ws = calloc((size_t)cfg.concurrency, sizeof *ws);
    for (int i = 0; i < cfg.concurrency; i++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        if (pthread_create(&ws[i].tid, &attr, worker_main, &ws[i]) != 0) die("pthread_create");
    }
    while (atomic_load(&ready_count) < cfg.concurrency) usleep(100);
    start_ns = now_ns();
    deadline_ns = start_ns + (uint64_t)(cfg.duration * 1e9);
    atomic_store(&go, 1);

    size_t total = 0;
    uint64_t ec = 0, es = 0, eio = 0, bytes = 0, last = start_ns;
    for (int i = 0; i < cfg.concurrency; i++) {
        pthread_join(ws[i].tid, NULL);
        total += ws[i].n;
        ec += ws[i].errors_connect;
        es += ws[i].errors_status;
        eio += ws[i].errors_io;
        bytes += ws[i].bytes;
        if (ws[i].last_done_ns > last) last = ws[i].last_done_ns;
    }
    uint64_t *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    double sum = 0;
    for (int i = 0; i < cfg.concurrency; i++) {
        memcpy(all + k, ws[i].lat, ws[i].n * sizeof *all);
        k += ws[i].n;
        for (size_t j = 0; j < ws[i].n; j++) sum += (double)ws[i].lat[j];
    }
    qsort(all, total, sizeof *all, cmp_u64);
    /* Elapsed ends at the last completed request, not the deadline, so
       in-flight requests that finish late are not counted as free. */
    double elapsed = (double)((last > deadline_ns ? last : deadline_ns) - start_ns) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"ok\": %zu, \"errors\": %llu, \"errors_connect\": %llu, \"errors_status\": %llu, "
           "\"errors_io\": %llu, \"elapsed_s\": %.4f, \"rps\": %.1f, \"mean_ms\": %.4f, "
           "\"p50_ms\": %.4f, \"p90_ms\": %.4f, \"p99_ms\": %.4f, \"max_ms\": %.4f, "
           "\"body_bytes\": %llu, \"cpu_s\": %.4f}\n",
           total, (unsigned long long)(ec + es + eio), (unsigned long long)ec, (unsigned long long)es,
           (unsigned long long)eio, elapsed, (double)total / elapsed, total ? sum / (double)total / 1e6 : 0.0,
           pct_ms(all, total, 0.50), pct_ms(all, total, 0.90), pct_ms(all, total, 0.99),
           total ? (double)all[total - 1] / 1e6 : 0.0, (unsigned long long)bytes, cpu);
    return 0;
}
