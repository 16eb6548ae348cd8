/*
 * check_fake_ibverbs.c - tests the fake RDMA verbs library (fake_ibverbs.c)
 * itself.
 *
 * Linked directly against libfakeibverbs.so and compiled against the real
 * <infiniband/verbs.h>, so the header's inline functions (ibv_post_send,
 * ibv_poll_cq, ibv_query_port, ibv_query_gid_ex, ...) are exercised as a real
 * program would use them. scripts/build-fakes.sh --check builds and runs it.
 * One line per check on stderr ("ok   name" / "FAIL name", with the failed
 * expectations indented above it); exit status 0 when everything passed.
 *
 * Other FAKE_IBV_DEVICES configurations are checked in children forked
 * before this process reads its own (the fake reads the environment once);
 * the cross-process data path uses a child forked later, which opens the
 * device anew, talks to the parent over a socketpair and exits without
 * cleaning up. Every wait is bounded (poll deadlines, alarm()).
 */
#define _GNU_SOURCE
#include <infiniband/verbs.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

uint64_t fake_ibv_bytes(const char *dev, int served);
int fake_ibv_live_qps(void);
int fake_ibv_live_mrs(void);
int fake_ibv_live_cqs(void);
int fake_ibv_live_pds(void);
int fake_ibv_live_contexts(void);
uint64_t fake_ibv_cq_overruns(void);
void fake_ibv_drop_link(const char *dev, int dropped);
void fake_ibv_set_delay_us(unsigned us);
void fake_ibv_corrupt_rkeys(unsigned n);
int fake_ibv_slot(const char *dev);

/* ---- checking helpers ---- */
static int g_checks, g_failed, cur_fail;
static const char *cur_name;

static void begin(const char *name)
{
    cur_name = name;
    cur_fail = 0;
}

static void end(void)
{
    g_checks++;
    if (cur_fail) {
        g_failed++;
        fprintf(stderr, "FAIL %s\n", cur_name);
    } else {
        fprintf(stderr, "ok   %s\n", cur_name);
    }
}

#define EXPECT(cond)                                                                       \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "    %s:%d: expected %s\n", __FILE__, __LINE__, #cond);        \
            cur_fail++;                                                                    \
        }                                                                                  \
    } while (0)
#define EXPECT_EQ(a, b)                                                                    \
    do {                                                                                   \
        long long a_ = (long long)(a), b_ = (long long)(b);                                \
        if (a_ != b_) {                                                                    \
            fprintf(stderr, "    %s:%d: %s == %lld, expected %s == %lld\n", __FILE__,      \
                    __LINE__, #a, a_, #b, b_);                                             \
            cur_fail++;                                                                    \
        }                                                                                  \
    } while (0)
/* set-up steps the rest depends on */
#define REQ(cond)                                                                          \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "FATAL %s:%d: %s (errno %d: %s)\n", __FILE__, __LINE__, #cond, \
                    errno, strerror(errno));                                               \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 131u + seed * 7u + (i >> 11));
}

static int matches(const unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 131u + seed * 7u + (i >> 11)))
            return 0;
    return 1;
}

/* Waits at most 20 s for a child; kills it past that. 0 = exited with 0. */
static int wait_child(pid_t pid)
{
    int st;
    for (int i = 0; i < 2000; i++) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return 255;
}

/* ---- verbs helpers ---- */
static int wait_wc(struct ibv_cq *cq, struct ibv_wc *wc, int timeout_ms)
{
    double end_t = now_s() + timeout_ms / 1000.0;
    for (;;) {
        int n = ibv_poll_cq(cq, 1, wc);
        if (n != 0)
            return n;
        if (now_s() > end_t)
            return 0;
        usleep(200);
    }
}

/* polls everything that arrives within ms */
static int drain_cq(struct ibv_cq *cq, struct ibv_wc *wc, int max, int ms)
{
    int got = 0;
    double end_t = now_s() + ms / 1000.0;
    while (now_s() < end_t && got < max) {
        int n = ibv_poll_cq(cq, max - got, wc + got);
        if (n > 0)
            got += n;
        else
            usleep(500);
    }
    return got;
}

static struct ibv_context *open_by_name(const char *name)
{
    int n = 0;
    struct ibv_device **l = ibv_get_device_list(&n);
    struct ibv_context *c = NULL;
    for (int i = 0; l && i < n; i++)
        if (!strcmp(ibv_get_device_name(l[i]), name))
            c = ibv_open_device(l[i]);
    ibv_free_device_list(l);
    return c;
}

struct linkopt {
    uint8_t timeout, retry, rnr_retry, min_rnr;
    unsigned access;
    uint8_t rd_atomic;
    int sgid;
};

static const struct linkopt LDEF = {14, 7, 7, 12,
                                    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ, 4, 3};

static struct ibv_qp *mkqp(struct ibv_pd *pd, struct ibv_cq *cq, uint32_t sw, uint32_t rw, uint32_t inl, int sig_all)
{
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = cq;
    ia.recv_cq = cq;
    ia.qp_type = IBV_QPT_RC;
    ia.sq_sig_all = sig_all;
    ia.cap.max_send_wr = sw;
    ia.cap.max_recv_wr = rw;
    ia.cap.max_send_sge = 4;
    ia.cap.max_recv_sge = 4;
    ia.cap.max_inline_data = inl;
    return ibv_create_qp(pd, &ia);
}

static int qp_init(struct ibv_qp *qp, unsigned access)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_INIT;
    a.port_num = 1;
    a.pkey_index = 0;
    a.qp_access_flags = access;
    return ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
}

static void rtr_attr(struct ibv_qp_attr *a, const union ibv_gid *dgid, uint16_t dlid, uint32_t dqpn, enum ibv_mtu mtu,
                     const struct linkopt *o)
{
    memset(a, 0, sizeof *a);
    a->qp_state = IBV_QPS_RTR;
    a->path_mtu = mtu;
    a->dest_qp_num = dqpn;
    a->rq_psn = 0x1234;
    a->max_dest_rd_atomic = o->rd_atomic;
    a->min_rnr_timer = o->min_rnr;
    a->ah_attr.port_num = 1;
    if (dgid) {
        a->ah_attr.is_global = 1;
        a->ah_attr.grh.dgid = *dgid;
        a->ah_attr.grh.sgid_index = (uint8_t)o->sgid;
        a->ah_attr.grh.hop_limit = 64;
    } else {
        a->ah_attr.dlid = dlid;
    }
}

#define RTR_MASK                                                                                           \
    (IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | \
     IBV_QP_MIN_RNR_TIMER)
#define RTS_MASK \
    (IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC)

static void rts_attr(struct ibv_qp_attr *a, const struct linkopt *o)
{
    memset(a, 0, sizeof *a);
    a->qp_state = IBV_QPS_RTS;
    a->timeout = o->timeout;
    a->retry_cnt = o->retry;
    a->rnr_retry = o->rnr_retry;
    a->sq_psn = 0x1234;
    a->max_rd_atomic = o->rd_atomic;
}

/* RESET -> INIT -> RTR -> RTS towards (dgid or dlid, dqpn) */
static int qp_connect(struct ibv_qp *qp, const union ibv_gid *dgid, uint16_t dlid, uint32_t dqpn, enum ibv_mtu mtu,
                      const struct linkopt *o)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RESET;
    if (ibv_modify_qp(qp, &a, IBV_QP_STATE))
        return -1;
    if (qp_init(qp, o->access))
        return -2;
    rtr_attr(&a, dgid, dlid, dqpn, mtu, o);
    if (ibv_modify_qp(qp, &a, RTR_MASK))
        return -3;
    rts_attr(&a, o);
    if (ibv_modify_qp(qp, &a, RTS_MASK))
        return -4;
    return 0;
}

static int qp_state(struct ibv_qp *qp)
{
    struct ibv_qp_attr a;
    struct ibv_qp_init_attr ia;
    if (ibv_query_qp(qp, &a, IBV_QP_STATE, &ia))
        return -1;
    return a.qp_state;
}

static int post_wr(struct ibv_qp *qp, enum ibv_wr_opcode op, uint64_t wr_id, void *laddr, uint32_t len, uint32_t lkey,
                   uint64_t raddr, uint32_t rkey, unsigned flags, uint32_t imm)
{
    struct ibv_sge sge = {(uintptr_t)laddr, len, lkey};
    struct ibv_send_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = len ? &sge : NULL;
    wr.num_sge = len ? 1 : 0;
    wr.opcode = op;
    wr.send_flags = flags;
    wr.imm_data = imm;
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    return ibv_post_send(qp, &wr, &bad);
}

static int post_recv1(struct ibv_qp *qp, uint64_t wr_id, void *addr, uint32_t len, uint32_t lkey)
{
    struct ibv_sge sge = {(uintptr_t)addr, len, lkey};
    struct ibv_recv_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    return ibv_post_recv(qp, &wr, &bad);
}

/* ---- the environment children ---- */
static int child_empty(void)
{
    setenv("FAKE_IBV_DEVICES", "", 1);
    int n = -1;
    struct ibv_device **l = ibv_get_device_list(&n);
    begin("FAKE_IBV_DEVICES='' gives an empty list");
    EXPECT(l != NULL);
    EXPECT_EQ(n, 0);
    EXPECT(l && l[0] == NULL);
    EXPECT_EQ(fake_ibv_slot("fake_mlx5_0"), -1);
    end();
    ibv_free_device_list(l);
    return g_failed;
}

static int child_default(void)
{
    unsetenv("FAKE_IBV_DEVICES");
    int n = 0;
    struct ibv_device **l = ibv_get_device_list(&n);
    begin("FAKE_IBV_DEVICES unset: fake_mlx5_0 and fake_mlx5_1 on 127.0.0.1/.2");
    EXPECT_EQ(n, 2);
    if (n == 2) {
        EXPECT(!strcmp(ibv_get_device_name(l[0]), "fake_mlx5_0"));
        EXPECT(!strcmp(ibv_get_device_name(l[1]), "fake_mlx5_1"));
        struct ibv_context *c = ibv_open_device(l[1]);
        union ibv_gid g;
        EXPECT(c != NULL);
        if (c) {
            EXPECT_EQ(ibv_query_gid(c, 1, 3, &g), 0);
            static const uint8_t want[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2};
            EXPECT(!memcmp(g.raw, want, 16));
            int sl = fake_ibv_slot("fake_mlx5_1"); /* getpid() % 4095 + 1 unless taken by a live process */
            EXPECT(sl >= 1 && sl <= 4095);
            EXPECT_EQ(fake_ibv_slot("fake_mlx5_0"), 0);
            ibv_close_device(c);
        }
    }
    end();
    ibv_free_device_list(l);
    return g_failed;
}

static int child_ib(void)
{
    setenv("FAKE_IBV_DEVICES", "ib0:ll=ib:lid=7,ib1:ll=ib:lid=9,r0:ip=10.1.2.3:mtu=1024:numa=1:state=down:maxmr=1g,"
                               "bad$name,r1:bogus=1",
           1);
    int n = 0;
    struct ibv_device **l = ibv_get_device_list(&n);
    begin("FAKE_IBV_DEVICES parsing (ib, ip, mtu, numa, state, maxmr; bad entries ignored)");
    EXPECT_EQ(n, 4);
    REQ(n == 4);
    EXPECT(!strcmp(ibv_get_device_name(l[3]), "r1"));
    struct ibv_context *ib0 = ibv_open_device(l[0]), *ib1 = ibv_open_device(l[1]), *r0 = ibv_open_device(l[2]);
    REQ(ib0 && ib1 && r0);
    struct ibv_port_attr pa;
    EXPECT_EQ(ibv_query_port(ib0, 1, &pa), 0);
    EXPECT_EQ(pa.link_layer, IBV_LINK_LAYER_INFINIBAND);
    EXPECT_EQ(pa.lid, 7);
    EXPECT_EQ(pa.sm_lid, 1);
    EXPECT_EQ(pa.gid_tbl_len, 1);
    EXPECT_EQ(pa.state, IBV_PORT_ACTIVE);
    EXPECT_EQ(pa.active_mtu, IBV_MTU_4096);
    EXPECT_EQ(ibv_query_port(r0, 1, &pa), 0);
    EXPECT_EQ(pa.state, IBV_PORT_DOWN);
    EXPECT_EQ(pa.active_mtu, IBV_MTU_1024);
    EXPECT_EQ(pa.max_mtu, IBV_MTU_1024);
    EXPECT_EQ(pa.link_layer, IBV_LINK_LAYER_ETHERNET);
    struct ibv_device_attr da;
    EXPECT_EQ(ibv_query_device(r0, &da), 0);
    EXPECT_EQ(da.max_mr_size, 1ull << 30);
    char path[512], buf[16] = {0};
    snprintf(path, sizeof path, "%s/device/numa_node", l[2]->ibdev_path);
    FILE *f = fopen(path, "r");
    EXPECT(f != NULL);
    if (f) {
        EXPECT(fgets(buf, sizeof buf, f) != NULL);
        EXPECT(!strcmp(buf, "1\n"));
        fclose(f);
    }
    union ibv_gid g;
    EXPECT_EQ(ibv_query_gid(r0, 1, 2, &g), 0);
    EXPECT(g.raw[12] == 10 && g.raw[13] == 1 && g.raw[14] == 2 && g.raw[15] == 3);
    end();

    begin("IB port: one GID fe80::/64 + port GUID, type IB; pkeys");
    struct ibv_gid_entry e;
    EXPECT_EQ(ibv_query_gid_ex(ib0, 1, 0, &e, 0), 0);
    EXPECT_EQ(e.gid_type, IBV_GID_TYPE_IB);
    EXPECT(e.gid.raw[0] == 0xfe && e.gid.raw[1] == 0x80);
    EXPECT(e.gid.global.interface_id == ibv_get_device_guid(l[0]));
    EXPECT(ibv_query_gid(ib0, 1, 1, &g) != 0);
    __be16 pk = 0;
    EXPECT_EQ(ibv_query_pkey(ib0, 1, 0, &pk), 0);
    EXPECT_EQ(ntohs(pk), 0xffff);
    EXPECT_EQ(ibv_query_pkey(ib0, 1, 127, &pk), 0);
    EXPECT(ibv_query_pkey(ib0, 1, 128, &pk) != 0);
    end();

    begin("IB data path: WRITE ib0 -> ib1 addressed by LID (is_global = 0)");
    struct ibv_pd *p0 = ibv_alloc_pd(ib0), *p1 = ibv_alloc_pd(ib1);
    struct ibv_cq *c0 = ibv_create_cq(ib0, 16, NULL, NULL, 0), *c1 = ibv_create_cq(ib1, 16, NULL, NULL, 0);
    REQ(p0 && p1 && c0 && c1);
    struct ibv_qp *q0 = mkqp(p0, c0, 8, 8, 0, 0), *q1 = mkqp(p1, c1, 8, 8, 0, 0);
    REQ(q0 && q1);
    static unsigned char s[4096], d[4096];
    fill(s, sizeof s, 5);
    struct ibv_mr *m0 = ibv_reg_mr(p0, s, sizeof s, IBV_ACCESS_LOCAL_WRITE);
    struct ibv_mr *m1 = ibv_reg_mr(p1, d, sizeof d, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    REQ(m0 && m1);
    struct linkopt o = LDEF;
    EXPECT_EQ(qp_connect(q0, NULL, 9, q1->qp_num, IBV_MTU_4096, &o), 0);
    EXPECT_EQ(qp_connect(q1, NULL, 7, q0->qp_num, IBV_MTU_4096, &o), 0);
    EXPECT_EQ(post_wr(q0, IBV_WR_RDMA_WRITE, 1, s, sizeof s, m0->lkey, (uintptr_t)d, m1->rkey, IBV_SEND_SIGNALED, 0),
              0);
    struct ibv_wc wc;
    EXPECT_EQ(wait_wc(c0, &wc, 3000), 1);
    EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
    EXPECT(matches(d, sizeof d, 5));
    end();
    ibv_free_device_list(l);
    exit(g_failed ? 1 : 0); /* live objects and threads on purpose: exit must not hang */
}

static void run_env_children(void)
{
    int (*fns[])(void) = {child_empty, child_default, child_ib};
    const char *names[] = {"child: empty device list", "child: default devices", "child: IB and option parsing"};
    for (int i = 0; i < 3; i++) {
        pid_t pid = fork();
        REQ(pid >= 0);
        if (pid == 0) {
            alarm(20);
            exit(fns[i]() ? 1 : 0); /* runs the fake's destructor (its sysfs look-alike) */
        }
        int rc = wait_child(pid);
        begin(names[i]);
        EXPECT_EQ(rc, 0);
        end();
    }
}

/* ---- the main process: devices "fa" (127.0.0.11, mtu 4096), "fb" (127.0.0.12, mtu 2048) ---- */
#define BUFSZ (8u << 20)

struct side {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_cq *cq;
    struct ibv_mr *mr;
    unsigned char *buf;
    union ibv_gid gid; /* the GID the peer addresses */
};

static struct side A, B;
static const char *DA = "fa", *DB = "fb";

struct pair {
    struct ibv_qp *a, *b;
};

static struct pair mkpair(uint32_t sw, uint32_t rw, uint32_t inl)
{
    struct pair p = {mkqp(A.pd, A.cq, sw, rw, inl, 0), mkqp(B.pd, B.cq, sw, rw, inl, 0)};
    REQ(p.a && p.b);
    return p;
}

static int connect_pair(struct pair *p, const struct linkopt *oa, const struct linkopt *ob)
{
    struct linkopt a = oa ? *oa : LDEF, b = ob ? *ob : LDEF;
    a.sgid = 3;
    b.sgid = 0;
    if (qp_connect(p->a, &B.gid, 0, p->b->qp_num, IBV_MTU_2048, &a))
        return -1;
    if (qp_connect(p->b, &A.gid, 0, p->a->qp_num, IBV_MTU_2048, &b))
        return -2;
    return 0;
}

static void destroy_pair(struct pair *p)
{
    if (p->a)
        EXPECT_EQ(ibv_destroy_qp(p->a), 0);
    if (p->b)
        EXPECT_EQ(ibv_destroy_qp(p->b), 0);
    p->a = p->b = NULL;
}

static void clear_cqs(void)
{
    struct ibv_wc wc[64];
    while (ibv_poll_cq(A.cq, 64, wc) > 0) {
    }
    while (ibv_poll_cq(B.cq, 64, wc) > 0) {
    }
}

static void test_devices(void)
{
    int n = 0;
    struct ibv_device **l = ibv_get_device_list(&n);
    begin("device list from FAKE_IBV_DEVICES: names, guid, node/transport type, sysfs look-alike");
    REQ(l && n == 2);
    EXPECT(!strcmp(ibv_get_device_name(l[0]), "fa"));
    EXPECT(!strcmp(ibv_get_device_name(l[1]), "fb"));
    EXPECT(l[2] == NULL);
    EXPECT(ibv_get_device_guid(l[0]) != 0);
    EXPECT(ibv_get_device_guid(l[0]) != ibv_get_device_guid(l[1]));
    EXPECT_EQ(l[0]->node_type, IBV_NODE_CA);
    EXPECT_EQ(l[0]->transport_type, IBV_TRANSPORT_IB);
    EXPECT(!strcmp(l[0]->name, "fa"));
    EXPECT(l[0]->dev_name[0] && l[0]->dev_path[0]);
    char path[512], buf[16] = {0};
    snprintf(path, sizeof path, "%s/device/numa_node", l[1]->ibdev_path);
    FILE *f = fopen(path, "r");
    EXPECT(f != NULL);
    if (f) {
        EXPECT(fgets(buf, sizeof buf, f) && !strcmp(buf, "0\n"));
        fclose(f);
    }
    EXPECT_EQ(fake_ibv_slot("fa"), 0);
    EXPECT_EQ(fake_ibv_slot("nope"), -1);
    A.ctx = ibv_open_device(l[0]);
    B.ctx = ibv_open_device(l[1]);
    REQ(A.ctx && B.ctx);
    EXPECT_EQ(fake_ibv_live_contexts(), 2);
    end();
    ibv_free_device_list(l);

    begin("context: ops.post_send/post_recv/poll_cq/req_notify_cq set, no extended verbs, fds");
    EXPECT(A.ctx->ops.post_send && A.ctx->ops.post_recv && A.ctx->ops.poll_cq && A.ctx->ops.req_notify_cq);
    EXPECT(A.ctx->ops.post_srq_recv == NULL && A.ctx->ops.alloc_mw == NULL);
    EXPECT(A.ctx->abi_compat == NULL);
    EXPECT(A.ctx->device != NULL && !strcmp(A.ctx->device->name, "fa"));
    EXPECT(A.ctx->cmd_fd >= 0 && A.ctx->async_fd >= 0);
    EXPECT(A.ctx->num_comp_vectors > 0);
    EXPECT(fake_ibv_slot("fa") >= 1 && fake_ibv_slot("fa") <= 4095);
    end();

    begin("ibv_query_device");
    struct ibv_device_attr da;
    EXPECT_EQ(ibv_query_device(A.ctx, &da), 0);
    EXPECT_EQ(da.vendor_id, 0x02c9);
    EXPECT_EQ(da.max_qp_wr, 1024);
    EXPECT_EQ(da.max_sge, 30);
    EXPECT_EQ(da.max_qp_rd_atom, 16);
    EXPECT_EQ(da.max_qp, 65536);
    EXPECT_EQ(da.max_cqe, 65536);
    EXPECT_EQ(da.max_mr, 1 << 20);
    EXPECT_EQ(da.max_mr_size, 1ull << 40);
    EXPECT_EQ(da.phys_port_cnt, 1);
    EXPECT(da.node_guid == ibv_get_device_guid(A.ctx->device));
    end();

    begin("ibv_query_port (inline -> compat export): RoCE port, per-device MTU");
    struct ibv_port_attr pa;
    memset(&pa, 0x5a, sizeof pa);
    EXPECT_EQ(ibv_query_port(A.ctx, 1, &pa), 0);
    EXPECT_EQ(pa.state, IBV_PORT_ACTIVE);
    EXPECT_EQ(pa.active_mtu, IBV_MTU_4096);
    EXPECT_EQ(pa.link_layer, IBV_LINK_LAYER_ETHERNET);
    EXPECT_EQ(pa.gid_tbl_len, 4);
    EXPECT_EQ(pa.lid, 0);
    EXPECT_EQ(pa.port_cap_flags2, 0); /* zeroed by the inline wrapper, not written by compat */
    EXPECT_EQ(ibv_query_port(B.ctx, 1, &pa), 0);
    EXPECT_EQ(pa.active_mtu, IBV_MTU_2048);
    EXPECT(ibv_query_port(A.ctx, 2, &pa) != 0);
    end();

    begin("GIDs: fe80::ip and ::ffff:ip, RoCE v1/v2, _ibv_query_gid_ex/_table, index past the table");
    union ibv_gid g;
    static const uint8_t ll[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 127, 0, 0, 11};
    static const uint8_t v4[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 11};
    EXPECT_EQ(ibv_query_gid(A.ctx, 1, 0, &g), 0);
    EXPECT(!memcmp(g.raw, ll, 16));
    EXPECT_EQ(ibv_query_gid(A.ctx, 1, 3, &g), 0);
    EXPECT(!memcmp(g.raw, v4, 16));
    errno = 0;
    EXPECT_EQ(ibv_query_gid(A.ctx, 1, 4, &g), -1);
    EXPECT_EQ(errno, EINVAL);
    struct ibv_gid_entry e[8];
    EXPECT_EQ(ibv_query_gid_ex(A.ctx, 1, 1, &e[0], 0), 0);
    EXPECT_EQ(e[0].gid_type, IBV_GID_TYPE_ROCE_V2);
    EXPECT(!memcmp(e[0].gid.raw, ll, 16));
    EXPECT(ibv_query_gid_ex(A.ctx, 1, 4, &e[0], 0) != 0);
    ssize_t k = ibv_query_gid_table(A.ctx, e, 8, 0);
    EXPECT_EQ(k, 4);
    unsigned lo = if_nametoindex("lo");
    for (int i = 0; i < 4 && k == 4; i++) {
        EXPECT_EQ(e[i].gid_index, i);
        EXPECT_EQ(e[i].port_num, 1);
        EXPECT_EQ(e[i].gid_type, (i & 1) ? IBV_GID_TYPE_ROCE_V2 : IBV_GID_TYPE_ROCE_V1);
        EXPECT_EQ(e[i].ndev_ifindex, lo);
    }
    EXPECT(ibv_query_gid_table(A.ctx, e, 2, 0) < 0);
    __be16 pk;
    EXPECT_EQ(ibv_query_pkey(A.ctx, 1, 0, &pk), 0);
    EXPECT_EQ(ntohs(pk), 0xffff);
    EXPECT(ibv_query_pkey(A.ctx, 1, 1, &pk) != 0);
    EXPECT(!strcmp(ibv_wc_status_str(IBV_WC_RETRY_EXC_ERR), "transport retry counter exceeded"));
    EXPECT_EQ(ibv_fork_init(), 0);
    end();

    EXPECT_EQ(ibv_query_gid(A.ctx, 1, 3, &A.gid), 0); /* B reaches A by ::ffff:127.0.0.11 */
    EXPECT_EQ(ibv_query_gid(B.ctx, 1, 0, &B.gid), 0); /* A reaches B by fe80::127.0.0.12 */
}

static void test_memory(void)
{
    const unsigned full = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
    begin("PD/MR: keys, counters, argument errors, unmapped/PROT_NONE/read-only memory, RELAXED_ORDERING");
    A.pd = ibv_alloc_pd(A.ctx);
    B.pd = ibv_alloc_pd(B.ctx);
    REQ(A.pd && B.pd);
    EXPECT(A.pd->context == A.ctx);
    A.buf = malloc(BUFSZ);
    B.buf = malloc(BUFSZ);
    REQ(A.buf && B.buf);
    memset(A.buf, 0, BUFSZ);
    memset(B.buf, 0, BUFSZ);
    A.mr = ibv_reg_mr(A.pd, A.buf, BUFSZ, full);
    B.mr = ibv_reg_mr(B.pd, B.buf, BUFSZ, full | IBV_ACCESS_RELAXED_ORDERING);
    REQ(A.mr && B.mr);
    EXPECT(A.mr->lkey != A.mr->rkey);
    EXPECT(A.mr->addr == A.buf && A.mr->length == BUFSZ && A.mr->pd == A.pd && A.mr->context == A.ctx);
    EXPECT_EQ(fake_ibv_live_pds(), 2);
    EXPECT_EQ(fake_ibv_live_mrs(), 2);
    errno = 0;
    EXPECT(ibv_reg_mr(A.pd, A.buf, 0, full) == NULL && errno == EINVAL);
    errno = 0;
    EXPECT(ibv_reg_mr(A.pd, A.buf, 64, IBV_ACCESS_REMOTE_WRITE) == NULL && errno == EINVAL);
    errno = 0;
    EXPECT(ibv_reg_mr(A.pd, A.buf, (2ull << 40), full) == NULL && errno == EINVAL);
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *m = mmap(NULL, 3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQ(m != MAP_FAILED);
    munmap(m + pg, pg);
    errno = 0;
    EXPECT(ibv_reg_mr(A.pd, m, 3 * pg, full) == NULL && errno == EFAULT);
    mprotect(m + 2 * pg, pg, PROT_NONE);
    errno = 0;
    EXPECT(ibv_reg_mr(A.pd, m + 2 * pg, pg, IBV_ACCESS_REMOTE_READ) == NULL && errno == EFAULT);
    mprotect(m, pg, PROT_READ);
    errno = 0;
    EXPECT(ibv_reg_mr(A.pd, m, pg, IBV_ACCESS_LOCAL_WRITE) == NULL && errno == EFAULT);
    struct ibv_mr *ro = ibv_reg_mr(A.pd, m, pg, IBV_ACCESS_REMOTE_READ);
    EXPECT(ro != NULL);
    if (ro)
        EXPECT_EQ(ibv_dereg_mr(ro), 0);
    munmap(m, pg);
    munmap(m + 2 * pg, pg);
    struct ibv_mr *io = ibv_reg_mr_iova2(A.pd, A.buf, 4096, 0x10000000ull, full);
    EXPECT(io != NULL && io->addr == A.buf);
    if (io)
        EXPECT_EQ(ibv_dereg_mr(io), 0);
    errno = 0;
    EXPECT_EQ(ibv_dealloc_pd(A.pd), EBUSY);
    EXPECT_EQ(fake_ibv_live_mrs(), 2);
    end();

    begin("CQ: size rounded up to 2^k-1, argument errors, fields");
    A.cq = ibv_create_cq(A.ctx, 100, (void *)0x1234, NULL, 0);
    B.cq = ibv_create_cq(B.ctx, 4096, NULL, NULL, 1);
    REQ(A.cq && B.cq);
    EXPECT_EQ(A.cq->cqe, 127);
    EXPECT_EQ(B.cq->cqe, 8191);
    EXPECT(A.cq->context == A.ctx && A.cq->cq_context == (void *)0x1234 && A.cq->channel == NULL);
    errno = 0;
    EXPECT(ibv_create_cq(A.ctx, 0, NULL, NULL, 0) == NULL && errno == EINVAL);
    errno = 0;
    EXPECT(ibv_create_cq(A.ctx, 65537, NULL, NULL, 0) == NULL && errno == EINVAL);
    errno = 0;
    EXPECT(ibv_create_cq(A.ctx, 8, NULL, NULL, A.ctx->num_comp_vectors) == NULL && errno == EINVAL);
    EXPECT_EQ(fake_ibv_live_cqs(), 2);
    end();
}

static void test_qp_state_machine(void)
{
    begin("QP creation: RC only, caps rounded and reported, QPN = slot << 12 | index");
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = ia.recv_cq = A.cq;
    ia.qp_type = IBV_QPT_UD;
    ia.cap.max_send_wr = ia.cap.max_recv_wr = 4;
    ia.cap.max_send_sge = ia.cap.max_recv_sge = 1;
    errno = 0;
    EXPECT(ibv_create_qp(A.pd, &ia) == NULL && errno == EINVAL);
    ia.qp_type = IBV_QPT_RC;
    ia.cap.max_inline_data = 300;
    errno = 0;
    EXPECT(ibv_create_qp(A.pd, &ia) == NULL && errno == EINVAL);
    ia.cap.max_inline_data = 64;
    ia.cap.max_send_wr = 2000;
    errno = 0;
    EXPECT(ibv_create_qp(A.pd, &ia) == NULL && errno == EINVAL);
    ia.cap.max_send_wr = 100;
    ia.cap.max_recv_wr = 5;
    ia.qp_context = (void *)0x77;
    struct ibv_qp *qp = ibv_create_qp(A.pd, &ia);
    REQ(qp);
    EXPECT_EQ(ia.cap.max_send_wr, 128);
    EXPECT_EQ(ia.cap.max_recv_wr, 8);
    EXPECT_EQ(ia.cap.max_inline_data, 64);
    EXPECT_EQ(qp->qp_num >> 12, (unsigned)fake_ibv_slot("fa"));
    EXPECT(qp->context == A.ctx && qp->pd == A.pd && qp->send_cq == A.cq && qp->qp_context == (void *)0x77);
    EXPECT_EQ(qp->state, IBV_QPS_RESET);
    EXPECT_EQ(qp->qp_type, IBV_QPT_RC);
    EXPECT_EQ(fake_ibv_live_qps(), 1);
    errno = 0;
    EXPECT_EQ(ibv_destroy_cq(A.cq), EBUSY);
    end();

    begin("QP state machine: posting before RTS, wrong transitions, missing/extra mask bits, AV rules");
    unsigned char x[8];
    struct ibv_sge sge = {(uintptr_t)x, 8, A.mr->lkey};
    struct ibv_send_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_WRITE;
    EXPECT_EQ(ibv_post_send(qp, &wr, &bad), EINVAL);
    EXPECT(bad == &wr);
    struct ibv_recv_wr rwr, *rbad = NULL;
    memset(&rwr, 0, sizeof rwr);
    EXPECT_EQ(ibv_post_recv(qp, &rwr, &rbad), EINVAL);
    struct ibv_qp_attr a;
    struct linkopt o = LDEF;
    rtr_attr(&a, &B.gid, 0, 0x1000, IBV_MTU_1024, &o);
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTR_MASK), EINVAL); /* RESET -> RTR */
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_INIT;
    a.port_num = 1;
    EXPECT_EQ(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT), EINVAL);
    EXPECT_EQ(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS |
                                        IBV_QP_TIMEOUT), EINVAL);
    a.port_num = 2;
    EXPECT_EQ(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS), EINVAL);
    EXPECT_EQ(qp_init(qp, LDEF.access), 0);
    EXPECT_EQ(qp->state, IBV_QPS_INIT);
    EXPECT_EQ(ibv_post_send(qp, &wr, &bad), EINVAL);
    EXPECT_EQ(post_recv1(qp, 1, x, 8, A.mr->lkey), 0); /* allowed from INIT */
    rtr_attr(&a, &B.gid, 0, 0x1000, IBV_MTU_1024, &o);
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTR_MASK & ~IBV_QP_MIN_RNR_TIMER), EINVAL);
    a.ah_attr.is_global = 0;
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTR_MASK), EINVAL); /* RoCE needs a GRH */
    rtr_attr(&a, &B.gid, 0, 0x1000, IBV_MTU_1024, &o);
    a.ah_attr.grh.sgid_index = 4;
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTR_MASK), EINVAL);
    rtr_attr(&a, &B.gid, 0, 0x1000, IBV_MTU_1024, &o);
    a.ah_attr.port_num = 0;
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTR_MASK), EINVAL);
    rtr_attr(&a, &B.gid, 0, 0x1000, IBV_MTU_4096, &o);
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTR_MASK), 0); /* fa's port is 4096 */
    EXPECT_EQ(ibv_post_send(qp, &wr, &bad), EINVAL);
    rts_attr(&a, &o);
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTS_MASK & ~IBV_QP_SQ_PSN), EINVAL);
    a.retry_cnt = 8;
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTS_MASK), EINVAL);
    rts_attr(&a, &o);
    a.timeout = 17;
    EXPECT_EQ(ibv_modify_qp(qp, &a, RTS_MASK), 0);
    struct ibv_qp_init_attr qia;
    memset(&a, 0, sizeof a);
    EXPECT_EQ(ibv_query_qp(qp, &a, IBV_QP_STATE, &qia), 0);
    EXPECT_EQ(a.qp_state, IBV_QPS_RTS);
    EXPECT_EQ(a.timeout, 17);
    EXPECT_EQ(a.retry_cnt, 7);
    EXPECT_EQ(a.min_rnr_timer, 12);
    EXPECT_EQ(a.dest_qp_num, 0x1000);
    EXPECT_EQ(a.path_mtu, IBV_MTU_4096);
    EXPECT_EQ(a.sq_psn, 0x1234);
    EXPECT_EQ(a.qp_access_flags, LDEF.access);
    EXPECT_EQ(qia.cap.max_send_wr, 128);
    EXPECT_EQ(qia.qp_context, (void *)0x77);
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_ERR;
    EXPECT_EQ(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT), EINVAL);
    EXPECT_EQ(ibv_modify_qp(qp, &a, IBV_QP_STATE), 0);
    struct ibv_wc wc;
    EXPECT_EQ(wait_wc(A.cq, &wc, 2000), 1); /* the receive posted in INIT is flushed */
    EXPECT(wc.wr_id == 1 && wc.status == IBV_WC_WR_FLUSH_ERR && wc.qp_num == qp->qp_num);
    EXPECT_EQ(ibv_destroy_qp(qp), 0);
    EXPECT_EQ(fake_ibv_live_qps(), 0);

    rtr_attr(&a, &A.gid, 0, 0x1000, IBV_MTU_4096, &o);
    struct ibv_qp *qb = mkqp(B.pd, B.cq, 4, 4, 0, 0);
    REQ(qb);
    EXPECT_EQ(qp_init(qb, LDEF.access), 0);
    EXPECT_EQ(ibv_modify_qp(qb, &a, RTR_MASK), EINVAL); /* fb's port is 2048 */
    EXPECT_EQ(ibv_destroy_qp(qb), 0);
    clear_cqs();
    end();
}

static uint64_t rd(uint64_t off) { return (uintptr_t)B.buf + off; }

static void test_data_path(void)
{
    struct ibv_wc wc, wcs[16];
    struct pair p = mkpair(64, 64, 128);
    uint32_t al = A.mr->lkey, br = B.mr->rkey, bl = B.mr->lkey;

    begin("connect two QPs on two devices (RoCE, fe80:: and ::ffff: GIDs)");
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(p.a->state, IBV_QPS_RTS);
    end();

    begin("RDMA WRITE: data lands, one CQE after the data, bytes counters");
    uint64_t out0 = fake_ibv_bytes(DA, 0), in0 = fake_ibv_bytes(DB, 1);
    fill(A.buf, 65536, 1);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 11, A.buf, 65536, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 11 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RDMA_WRITE);
    EXPECT_EQ(wc.qp_num, p.a->qp_num);
    EXPECT(matches(B.buf, 65536, 1));
    EXPECT_EQ(fake_ibv_bytes(DA, 0) - out0, 65536);
    EXPECT_EQ(fake_ibv_bytes(DB, 1) - in0, 65536);
    EXPECT_EQ(fake_ibv_bytes("nope", 0), 0);
    end();

    begin("RDMA WRITE 8 MiB (chunked) and READ it back 8 MiB");
    fill(A.buf, BUFSZ, 2);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 12, A.buf, BUFSZ, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 5000), 1);
    EXPECT(wc.status == IBV_WC_SUCCESS && matches(B.buf, BUFSZ, 2));
    memset(A.buf, 0, BUFSZ);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_READ, 13, A.buf, BUFSZ, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 5000), 1);
    EXPECT(wc.wr_id == 13 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RDMA_READ);
    EXPECT_EQ(wc.byte_len, BUFSZ);
    EXPECT(matches(A.buf, BUFSZ, 2));
    end();

    begin("RDMA WRITE_WITH_IMM: receive completion RECV_RDMA_WITH_IMM with imm and length");
    fill(A.buf, 1000, 3);
    EXPECT_EQ(post_recv1(p.b, 21, B.buf + 1 * 1048576, 16, bl), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE_WITH_IMM, 22, A.buf, 1000, al, rd(4096), br, IBV_SEND_SIGNALED,
                      htonl(0xabcd1234)),
              0);
    EXPECT_EQ(wait_wc(B.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 21 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM);
    EXPECT(wc.wc_flags & IBV_WC_WITH_IMM);
    EXPECT_EQ(ntohl(wc.imm_data), 0xabcd1234);
    EXPECT_EQ(wc.byte_len, 1000);
    EXPECT_EQ(wc.qp_num, p.b->qp_num);
    EXPECT_EQ(wc.src_qp, p.a->qp_num);
    EXPECT(matches(B.buf + 4096, 1000, 3));
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 22 && wc.status == IBV_WC_SUCCESS);
    end();

    begin("SEND/RECV with 2 SGEs each side, SEND_WITH_IMM");
    struct ibv_sge rs[2] = {{rd(2 << 20), 1000, bl}, {rd(3 << 20), 5000, bl}};
    struct ibv_recv_wr rw = {31, NULL, rs, 2}, *rbad;
    EXPECT_EQ(ibv_post_recv(p.b, &rw, &rbad), 0);
    fill(A.buf, 3000, 4);
    struct ibv_sge ss[2] = {{(uintptr_t)A.buf, 1500, al}, {(uintptr_t)A.buf + 1500, 1500, al}};
    struct ibv_send_wr sw, *sbad;
    memset(&sw, 0, sizeof sw);
    sw.wr_id = 32;
    sw.sg_list = ss;
    sw.num_sge = 2;
    sw.opcode = IBV_WR_SEND;
    sw.send_flags = IBV_SEND_SIGNALED;
    EXPECT_EQ(ibv_post_send(p.a, &sw, &sbad), 0);
    EXPECT_EQ(wait_wc(B.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 31 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RECV && wc.byte_len == 3000);
    EXPECT(!(wc.wc_flags & IBV_WC_WITH_IMM));
    unsigned char *got = malloc(3000);
    REQ(got);
    memcpy(got, B.buf + (2 << 20), 1000);
    memcpy(got + 1000, B.buf + (3 << 20), 2000);
    EXPECT(matches(got, 3000, 4));
    free(got);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 32 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_SEND);
    EXPECT_EQ(post_recv1(p.b, 33, B.buf, 64, bl), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND_WITH_IMM, 34, A.buf, 10, al, 0, 0, IBV_SEND_SIGNALED, htonl(7)), 0);
    EXPECT_EQ(wait_wc(B.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 33 && wc.opcode == IBV_WC_RECV && (wc.wc_flags & IBV_WC_WITH_IMM) && ntohl(wc.imm_data) == 7);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    end();

    begin("inline SEND (no lkey, data copied at post time); inline > max_inline_data: EINVAL");
    unsigned char inl[100];
    fill(inl, sizeof inl, 5);
    EXPECT_EQ(post_recv1(p.b, 41, B.buf, 128, bl), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND, 42, inl, sizeof inl, 0xdeadbeef, 0, 0, IBV_SEND_SIGNALED | IBV_SEND_INLINE, 0),
              0);
    memset(inl, 0, sizeof inl); /* the data were taken at post time */
    EXPECT_EQ(wait_wc(B.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 41 && wc.status == IBV_WC_SUCCESS && wc.byte_len == 100 && matches(B.buf, 100, 5));
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    unsigned char big[200];
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND, 43, big, sizeof big, 0, 0, 0, IBV_SEND_INLINE, 0), EINVAL);
    end();

    begin("selective signalling: unsignaled WRs give no CQE");
    fill(A.buf, 4 * 4096, 6);
    for (int i = 0; i < 4; i++)
        EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 50 + i, A.buf + i * 4096, 4096, al, rd(i * 4096), br,
                          i == 3 ? IBV_SEND_SIGNALED : 0, 0),
                  0);
    EXPECT_EQ(drain_cq(A.cq, wcs, 16, 300), 1);
    EXPECT(wcs[0].wr_id == 53 && wcs[0].status == IBV_WC_SUCCESS);
    EXPECT(matches(B.buf, 4 * 4096, 6));
    end();

    begin("ordering: a 4 MiB WRITE then a SEND: when the receive completes the written bytes are there");
    memset(B.buf, 0, 4 << 20);
    fill(A.buf, 4 << 20, 7);
    EXPECT_EQ(post_recv1(p.b, 61, B.buf + (6 << 20), 64, bl), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 62, A.buf, 4 << 20, al, rd(0), br, 0, 0), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND, 63, A.buf, 8, al, 0, 0, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(B.cq, &wc, 5000), 1);
    EXPECT(wc.wr_id == 61 && wc.status == IBV_WC_SUCCESS);
    EXPECT(matches(B.buf, 4 << 20, 7));
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT_EQ(wc.wr_id, 63);
    end();

    begin("SEND longer than the receive: LOC_LEN_ERR at the receiver, REM_INV_REQ_ERR at the sender, both ERR");
    EXPECT_EQ(post_recv1(p.b, 71, B.buf, 100, bl), 0);
    EXPECT_EQ(post_recv1(p.b, 72, B.buf, 100, bl), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND, 73, A.buf, 200, al, 0, 0, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 73 && wc.status == IBV_WC_REM_INV_REQ_ERR);
    EXPECT_EQ(drain_cq(B.cq, wcs, 16, 100), 2);
    EXPECT(wcs[0].wr_id == 71 && wcs[0].status == IBV_WC_LOC_LEN_ERR);
    EXPECT(wcs[1].wr_id == 72 && wcs[1].status == IBV_WC_WR_FLUSH_ERR);
    EXPECT_EQ(qp_state(p.a), IBV_QPS_ERR);
    EXPECT_EQ(qp_state(p.b), IBV_QPS_ERR);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 74, A.buf, 8, al, rd(0), br, 0, 0), 0); /* ERR: flushed */
    EXPECT_EQ(wait_wc(A.cq, &wc, 2000), 1);
    EXPECT(wc.wr_id == 74 && wc.status == IBV_WC_WR_FLUSH_ERR);
    end();

    begin("wrong rkey: REM_ACCESS_ERR, later WRs and the peer's receives flushed in order, both QPs ERR");
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(post_recv1(p.b, 81, B.buf, 64, bl), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 82, A.buf, 64, al, rd(0), br + 2, 0, 0), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 83, A.buf, 64, al, rd(0), br, 0, 0), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND, 84, A.buf, 64, al, 0, 0, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(drain_cq(A.cq, wcs, 16, 300), 3);
    EXPECT(wcs[0].wr_id == 82 && wcs[0].status == IBV_WC_REM_ACCESS_ERR);
    EXPECT(wcs[1].wr_id == 83 && wcs[1].status == IBV_WC_WR_FLUSH_ERR);
    EXPECT(wcs[2].wr_id == 84 && wcs[2].status == IBV_WC_WR_FLUSH_ERR);
    EXPECT_EQ(wait_wc(B.cq, &wc, 2000), 1);
    EXPECT(wc.wr_id == 81 && wc.status == IBV_WC_WR_FLUSH_ERR);
    EXPECT_EQ(qp_state(p.a), IBV_QPS_ERR);
    EXPECT_EQ(qp_state(p.b), IBV_QPS_ERR);
    EXPECT_EQ(p.a->state, IBV_QPS_ERR); /* refreshed by ibv_query_qp */
    end();

    begin("fake_ibv_corrupt_rkeys(1): the next RDMA WR fails with REM_ACCESS_ERR, the one after works");
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    fake_ibv_corrupt_rkeys(1);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 91, A.buf, 64, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 91 && wc.status == IBV_WC_REM_ACCESS_ERR);
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 92, A.buf, 64, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 92 && wc.status == IBV_WC_SUCCESS);
    end();

    begin("out-of-range WRITE and READ: REM_ACCESS_ERR; missing REMOTE_WRITE in qp_access_flags: REM_INV_REQ_ERR");
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 101, A.buf, 100, al, rd(BUFSZ - 10), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 101 && wc.status == IBV_WC_REM_ACCESS_ERR);
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_READ, 102, A.buf, 100, al, rd(0) - 1, br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 102 && wc.status == IBV_WC_REM_ACCESS_ERR);
    struct linkopt ro = LDEF;
    ro.access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ;
    EXPECT_EQ(connect_pair(&p, NULL, &ro), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 103, A.buf, 100, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 103 && wc.status == IBV_WC_REM_INV_REQ_ERR);
    end();

    begin("bad local lkey: LOC_PROT_ERR, QP to ERR");
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 111, A.buf, 100, al + 2, rd(0), br, 0, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 111 && wc.status == IBV_WC_LOC_PROT_ERR);
    EXPECT_EQ(qp_state(p.a), IBV_QPS_ERR);
    end();

    begin("deregistered remote MR: REM_ACCESS_ERR (keys invalid once ibv_dereg_mr returns)");
    struct ibv_mr *tmp = ibv_reg_mr(B.pd, B.buf, 65536, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    REQ(tmp);
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 121, A.buf, 100, al, rd(0), tmp->rkey, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 121 && wc.status == IBV_WC_SUCCESS);
    uint32_t old = tmp->rkey;
    EXPECT_EQ(ibv_dereg_mr(tmp), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 122, A.buf, 100, al, rd(0), old, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 122 && wc.status == IBV_WC_REM_ACCESS_ERR);
    end();

    begin("RNR: rnr_retry 1 and no receive -> RNR_RETRY_EXC_ERR; rnr_retry 7 waits for a late receive");
    struct linkopt r1 = LDEF;
    r1.rnr_retry = 1;
    EXPECT_EQ(connect_pair(&p, &r1, NULL), 0);
    double t0 = now_s();
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND, 131, A.buf, 10, al, 0, 0, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 131 && wc.status == IBV_WC_RNR_RETRY_EXC_ERR);
    EXPECT(now_s() - t0 < 1.0);
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_SEND, 132, A.buf, 10, al, 0, 0, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(drain_cq(A.cq, wcs, 4, 50), 0);
    EXPECT_EQ(post_recv1(p.b, 133, B.buf, 64, bl), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 132 && wc.status == IBV_WC_SUCCESS);
    EXPECT_EQ(wait_wc(B.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 133 && wc.status == IBV_WC_SUCCESS);
    end();

    begin("modify to RESET drops outstanding WRs without completions");
    fake_ibv_set_delay_us(200000);
    memset(B.buf, 0, 4096);
    fill(A.buf, 4096, 8);
    for (int i = 0; i < 3; i++)
        EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 141 + i, A.buf, 4096, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    sleep_ms(20);
    struct ibv_qp_attr at;
    memset(&at, 0, sizeof at);
    at.qp_state = IBV_QPS_RESET;
    EXPECT_EQ(ibv_modify_qp(p.a, &at, IBV_QP_STATE), 0);
    fake_ibv_set_delay_us(0);
    EXPECT_EQ(drain_cq(A.cq, wcs, 16, 300), 0);
    EXPECT(B.buf[0] == 0 && B.buf[4095] == 0);
    end();

    begin("modify to ERR flushes outstanding WRs in order (one in flight included)");
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    fake_ibv_set_delay_us(200000);
    for (int i = 0; i < 3; i++)
        EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 151 + i, A.buf, 64, al, rd(0), br, 0, 0), 0);
    sleep_ms(20);
    at.qp_state = IBV_QPS_ERR;
    EXPECT_EQ(ibv_modify_qp(p.a, &at, IBV_QP_STATE), 0);
    fake_ibv_set_delay_us(0);
    EXPECT_EQ(drain_cq(A.cq, wcs, 16, 300), 3);
    for (int i = 0; i < 3; i++)
        EXPECT(wcs[i].wr_id == (uint64_t)(151 + i) && wcs[i].status == IBV_WC_WR_FLUSH_ERR);
    end();

    begin("fake_ibv_drop_link: RETRY_EXC_ERR after the transport timeout; the link back works again");
    struct linkopt fast = LDEF;
    fast.timeout = 12;
    fast.retry = 3;
    EXPECT_EQ(connect_pair(&p, &fast, NULL), 0);
    fake_ibv_drop_link(DB, 1);
    struct ibv_port_attr pa;
    EXPECT_EQ(ibv_query_port(B.ctx, 1, &pa), 0);
    EXPECT_EQ(pa.state, IBV_PORT_DOWN);
    t0 = now_s();
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 161, A.buf, 64, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 161 && wc.status == IBV_WC_RETRY_EXC_ERR);
    EXPECT(now_s() - t0 < 1.5);
    fake_ibv_drop_link(DB, 0);
    EXPECT_EQ(connect_pair(&p, &fast, NULL), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 162, A.buf, 64, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 162 && wc.status == IBV_WC_SUCCESS);
    end();

    begin("PSN mismatch and a peer connected elsewhere: dropped, RETRY_EXC_ERR");
    EXPECT_EQ(connect_pair(&p, &fast, NULL), 0);
    /* reconnect a by hand with an sq_psn that is not b's rq_psn */
    {
        struct ibv_qp_attr a2;
        struct linkopt o = fast;
        o.sgid = 3;
        memset(&a2, 0, sizeof a2);
        a2.qp_state = IBV_QPS_RESET;
        EXPECT_EQ(ibv_modify_qp(p.a, &a2, IBV_QP_STATE), 0);
        EXPECT_EQ(qp_init(p.a, o.access), 0);
        rtr_attr(&a2, &B.gid, 0, p.b->qp_num, IBV_MTU_2048, &o);
        EXPECT_EQ(ibv_modify_qp(p.a, &a2, RTR_MASK), 0);
        rts_attr(&a2, &o);
        a2.sq_psn = 0x5000;
        EXPECT_EQ(ibv_modify_qp(p.a, &a2, RTS_MASK), 0);
    }
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 171, A.buf, 64, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 171 && wc.status == IBV_WC_RETRY_EXC_ERR);
    struct ibv_qp *other = mkqp(B.pd, B.cq, 4, 4, 0, 0);
    REQ(other);
    struct linkopt ob = LDEF;
    ob.sgid = 0;
    EXPECT_EQ(qp_connect(other, &A.gid, 0, p.a->qp_num + 1, IBV_MTU_2048, &ob), 0);
    struct linkopt oa = fast;
    oa.sgid = 3;
    EXPECT_EQ(qp_connect(p.a, &B.gid, 0, other->qp_num, IBV_MTU_2048, &oa), 0);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 172, A.buf, 64, al, rd(0), br, IBV_SEND_SIGNALED, 0), 0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 172 && wc.status == IBV_WC_RETRY_EXC_ERR);
    EXPECT_EQ(ibv_destroy_qp(other), 0);
    end();

    begin("send queue slots free only when a CQE is polled (mlx5): all-unsignaled QP fills, ENOMEM");
    {
        struct ibv_qp *q = mkqp(A.pd, A.cq, 4, 4, 0, 0), *qb = mkqp(B.pd, B.cq, 4, 4, 0, 0);
        REQ(q && qb);
        struct pair pq = {q, qb};
        EXPECT_EQ(connect_pair(&pq, NULL, NULL), 0);
        for (int i = 0; i < 4; i++)
            EXPECT_EQ(post_wr(q, IBV_WR_RDMA_WRITE, 180 + i, A.buf, 64, al, rd(0), br, 0, 0), 0);
        sleep_ms(50);
        EXPECT_EQ(post_wr(q, IBV_WR_RDMA_WRITE, 184, A.buf, 64, al, rd(0), br, IBV_SEND_SIGNALED, 0), ENOMEM);
        destroy_pair(&pq);
        q = mkqp(A.pd, A.cq, 4, 4, 0, 0);
        qb = mkqp(B.pd, B.cq, 4, 4, 0, 0);
        REQ(q && qb);
        pq.a = q;
        pq.b = qb;
        EXPECT_EQ(connect_pair(&pq, NULL, NULL), 0);
        for (int r = 0; r < 3; r++) {
            for (int i = 0; i < 4; i++)
                EXPECT_EQ(post_wr(q, IBV_WR_RDMA_WRITE, 190 + i, A.buf, 64, al, rd(0), br,
                                  i == 3 ? IBV_SEND_SIGNALED : 0, 0),
                          0);
            EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
            EXPECT(wc.wr_id == 193 && wc.status == IBV_WC_SUCCESS);
        }
        destroy_pair(&pq);
    }
    end();

    destroy_pair(&p);
    clear_cqs();
}

struct evarg {
    struct ibv_comp_channel *ch;
    struct ibv_cq *cq;
    void *ctx;
    int rc;
};

static void *ev_thread(void *p)
{
    struct evarg *a = p;
    a->rc = ibv_get_cq_event(a->ch, &a->cq, &a->ctx);
    return NULL;
}

static void test_channel(void)
{
    begin("completion channel: req_notify, blocking ibv_get_cq_event in a thread, fd, O_NONBLOCK, ack, EBUSY");
    struct ibv_comp_channel *ch = ibv_create_comp_channel(B.ctx);
    REQ(ch);
    EXPECT(ch->context == B.ctx && ch->fd >= 0 && ch->refcnt == 0);
    struct ibv_cq *cq = ibv_create_cq(B.ctx, 16, (void *)0xc0ffee, ch, 0);
    REQ(cq);
    EXPECT_EQ(ch->refcnt, 1);
    EXPECT(cq->channel == ch);
    struct ibv_qp *qa = mkqp(A.pd, A.cq, 8, 8, 0, 0), *qb = mkqp(B.pd, cq, 8, 8, 0, 0);
    REQ(qa && qb);
    struct pair p = {qa, qb};
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    EXPECT_EQ(ibv_req_notify_cq(cq, 0), 0);
    struct evarg ea = {ch, NULL, NULL, -2};
    pthread_t t;
    REQ(pthread_create(&t, NULL, ev_thread, &ea) == 0);
    sleep_ms(30);
    EXPECT_EQ(pthread_tryjoin_np(t, NULL), EBUSY); /* blocked: no event yet */
    EXPECT_EQ(post_recv1(qb, 1, B.buf, 64, B.mr->lkey), 0);
    EXPECT_EQ(post_wr(qa, IBV_WR_SEND, 2, A.buf, 8, A.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0), 0);
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 3;
    int jr = pthread_timedjoin_np(t, NULL, &dl);
    EXPECT_EQ(jr, 0);
    if (jr) {
        fprintf(stderr, "FATAL: ibv_get_cq_event did not return\n");
        exit(1);
    }
    EXPECT_EQ(ea.rc, 0);
    EXPECT(ea.cq == cq && ea.ctx == (void *)0xc0ffee);
    struct ibv_wc wc;
    EXPECT_EQ(wait_wc(cq, &wc, 1000), 1);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    /* second round: the fd becomes readable; non-blocking reads */
    EXPECT_EQ(ibv_req_notify_cq(cq, 0), 0);
    EXPECT_EQ(post_recv1(qb, 3, B.buf, 64, B.mr->lkey), 0);
    EXPECT_EQ(post_wr(qa, IBV_WR_SEND, 4, A.buf, 8, A.mr->lkey, 0, 0, 0, 0), 0);
    struct pollfd pf = {ch->fd, POLLIN, 0};
    EXPECT_EQ(poll(&pf, 1, 3000), 1);
    int fl = fcntl(ch->fd, F_GETFL);
    fcntl(ch->fd, F_SETFL, fl | O_NONBLOCK);
    struct ibv_cq *ecq = NULL;
    void *ectx = NULL;
    EXPECT_EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
    EXPECT(ecq == cq);
    errno = 0;
    EXPECT_EQ(ibv_get_cq_event(ch, &ecq, &ectx), -1);
    EXPECT_EQ(errno, EAGAIN);
    EXPECT_EQ(wait_wc(cq, &wc, 1000), 1);
    /* a completion on a CQ that is not armed gives no event */
    EXPECT_EQ(post_recv1(qb, 5, B.buf, 64, B.mr->lkey), 0);
    EXPECT_EQ(post_wr(qa, IBV_WR_SEND, 6, A.buf, 8, A.mr->lkey, 0, 0, 0, 0), 0);
    EXPECT_EQ(wait_wc(cq, &wc, 3000), 1);
    EXPECT_EQ(poll(&pf, 1, 50), 0);
    destroy_pair(&p);
    errno = 0;
    EXPECT_EQ(ibv_destroy_comp_channel(ch), EBUSY);
    EXPECT_EQ(ibv_destroy_cq(cq), EBUSY); /* two events not acknowledged */
    ibv_ack_cq_events(cq, 2);
    EXPECT_EQ(cq->comp_events_completed, 2);
    EXPECT_EQ(ibv_destroy_cq(cq), 0);
    EXPECT_EQ(ibv_destroy_comp_channel(ch), 0);
    clear_cqs();
    end();

    begin("CQ overrun: completions lost, counted");
    struct ibv_cq *small = ibv_create_cq(A.ctx, 1, NULL, NULL, 0);
    REQ(small);
    EXPECT_EQ(small->cqe, 1);
    struct ibv_qp *q2 = mkqp(A.pd, small, 8, 8, 0, 1), *q2b = mkqp(B.pd, B.cq, 8, 8, 0, 0);
    REQ(q2 && q2b);
    struct pair p2 = {q2, q2b};
    EXPECT_EQ(connect_pair(&p2, NULL, NULL), 0);
    uint64_t ov0 = fake_ibv_cq_overruns();
    for (int i = 0; i < 3; i++)
        EXPECT_EQ(post_wr(q2, IBV_WR_RDMA_WRITE, 200 + i, A.buf, 8, A.mr->lkey, rd(0), B.mr->rkey, 0, 0), 0);
    double t0 = now_s();
    while (fake_ibv_cq_overruns() - ov0 < 2 && now_s() - t0 < 3)
        usleep(1000);
    EXPECT_EQ(fake_ibv_cq_overruns() - ov0, 2);
    struct ibv_wc w3[4];
    EXPECT_EQ(ibv_poll_cq(small, 4, w3), 1);
    EXPECT_EQ(w3[0].wr_id, 200);
    destroy_pair(&p2);
    EXPECT_EQ(ibv_destroy_cq(small), 0);
    end();
}

/* ---- cross-process ---- */
struct xinfo {
    uint32_t qpn, rkey;
    uint64_t addr;
    union ibv_gid gid;
    int slot;
};

static int child_peer(int sock)
{
    alarm(20);
    struct ibv_context *c = open_by_name("fb");
    if (!c)
        return 10;
    struct ibv_pd *pd = ibv_alloc_pd(c);
    struct ibv_cq *cq = ibv_create_cq(c, 16, NULL, NULL, 0);
    unsigned char *buf = malloc(65536);
    if (!pd || !cq || !buf)
        return 11;
    memset(buf, 0, 65536);
    fill(buf + 8192, 4096, 9);
    struct ibv_mr *mr = ibv_reg_mr(pd, buf, 65536,
                                   IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
    struct ibv_qp *qp = mkqp(pd, cq, 8, 8, 0, 0);
    if (!mr || !qp)
        return 12;
    struct xinfo me = {qp->qp_num, mr->rkey, (uintptr_t)buf, {{0}}, fake_ibv_slot("fb")}, peer;
    if (ibv_query_gid(c, 1, 3, &me.gid))
        return 13;
    if (write(sock, &me, sizeof me) != sizeof me || read(sock, &peer, sizeof peer) != sizeof peer)
        return 14;
    struct linkopt o = LDEF;
    o.sgid = 3;
    if (qp_connect(qp, &peer.gid, 0, peer.qpn, IBV_MTU_2048, &o))
        return 15;
    char cmd = 0;
    if (write(sock, "r", 1) != 1 || read(sock, &cmd, 1) != 1 || cmd != 'c')
        return 16;
    char res = matches(buf, 4096, 10) ? 'y' : 'n';
    if (write(sock, &res, 1) != 1 || read(sock, &cmd, 1) != 1)
        return 17;
    _exit(0); /* no cleanup: the peer must notice that this process is gone */
}

static void test_cross_process(void)
{
    begin("cross-process: WRITE and READ against a forked peer with its own slot");
    int sv[2];
    REQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    pid_t pid = fork();
    REQ(pid >= 0);
    if (pid == 0) {
        close(sv[0]);
        _exit(child_peer(sv[1]));
    }
    close(sv[1]);
    struct timeval tv = {10, 0};
    setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct xinfo peer, me;
    struct ibv_qp *qp = mkqp(A.pd, A.cq, 8, 8, 0, 0);
    REQ(qp);
    memset(&me, 0, sizeof me);
    me.qpn = qp->qp_num;
    EXPECT_EQ(ibv_query_gid(A.ctx, 1, 3, &me.gid), 0);
    int ok = read(sv[0], &peer, sizeof peer) == sizeof peer && write(sv[0], &me, sizeof me) == sizeof me;
    EXPECT(ok);
    char r = 0;
    ok = ok && read(sv[0], &r, 1) == 1 && r == 'r';
    EXPECT(ok);
    if (ok) {
        EXPECT(peer.slot != fake_ibv_slot("fb"));
        EXPECT_EQ(peer.qpn >> 12, (unsigned)peer.slot);
        struct linkopt o = LDEF;
        o.sgid = 3;
        EXPECT_EQ(qp_connect(qp, &peer.gid, 0, peer.qpn, IBV_MTU_2048, &o), 0);
        struct ibv_wc wc;
        fill(A.buf, 4096, 10);
        EXPECT_EQ(post_wr(qp, IBV_WR_RDMA_WRITE, 1, A.buf, 4096, A.mr->lkey, peer.addr, peer.rkey, IBV_SEND_SIGNALED,
                          0),
                  0);
        EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
        EXPECT(wc.wr_id == 1 && wc.status == IBV_WC_SUCCESS);
        memset(A.buf, 0, 4096);
        EXPECT_EQ(post_wr(qp, IBV_WR_RDMA_READ, 2, A.buf, 4096, A.mr->lkey, peer.addr + 8192, peer.rkey,
                          IBV_SEND_SIGNALED, 0),
                  0);
        EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
        EXPECT(wc.wr_id == 2 && wc.status == IBV_WC_SUCCESS && matches(A.buf, 4096, 9));
        EXPECT(write(sv[0], "c", 1) == 1 && read(sv[0], &r, 1) == 1 && r == 'y');
        EXPECT(write(sv[0], "x", 1) == 1);
    }
    close(sv[0]);
    EXPECT_EQ(wait_child(pid), 0);
    end();

    begin("peer process gone: next WRITE completes with RETRY_EXC_ERR within about a second");
    double t0 = now_s();
    struct ibv_wc wc;
    EXPECT_EQ(post_wr(qp, IBV_WR_RDMA_WRITE, 3, A.buf, 64, A.mr->lkey, peer.addr, peer.rkey, IBV_SEND_SIGNALED, 0),
              0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.wr_id == 3 && wc.status == IBV_WC_RETRY_EXC_ERR);
    double dt = now_s() - t0;
    EXPECT(dt > 0.3 && dt < 1.5);
    end();

    begin("ibv_destroy_qp returns promptly while its requester waits on a timeout");
    struct linkopt o = LDEF;
    o.timeout = 0; /* the 1 s cap */
    o.sgid = 3;
    EXPECT_EQ(qp_connect(qp, &peer.gid, 0, peer.qpn, IBV_MTU_2048, &o), 0);
    EXPECT_EQ(post_wr(qp, IBV_WR_RDMA_WRITE, 4, A.buf, 64, A.mr->lkey, peer.addr, peer.rkey, IBV_SEND_SIGNALED, 0),
              0);
    sleep_ms(100);
    t0 = now_s();
    EXPECT_EQ(ibv_destroy_qp(qp), 0);
    EXPECT(now_s() - t0 < 0.3);
    EXPECT_EQ(drain_cq(A.cq, &wc, 1, 50), 0); /* destroy dropped it without a CQE */
    end();
}

static void test_garbage(void)
{
    begin("malformed peer input: connection dropped, the fake keeps working");
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    REQ(fd >= 0);
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    int n = snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "fake-ibv:127.0.0.12:%d", fake_ibv_slot("fb"));
    EXPECT_EQ(connect(fd, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n)), 0);
    unsigned char junk[256];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (unsigned char)(i * 37 + 11);
    EXPECT(send(fd, junk, sizeof junk, MSG_NOSIGNAL) == (ssize_t)sizeof junk);
    char c;
    struct timeval tv = {3, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t k = recv(fd, &c, 1, 0);
    EXPECT(k == 0 || (k < 0 && errno == ECONNRESET)); /* closed by the fake */
    close(fd);
    /* a well-formed header with a huge length */
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    EXPECT_EQ(connect(fd, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n)), 0);
    uint32_t hdr[16];
    memset(hdr, 0, sizeof hdr);
    hdr[0] = 0x52564946u;
    hdr[1] = 1;
    hdr[14] = 0xffffffffu;
    hdr[15] = 0xffffffffu;
    EXPECT(send(fd, hdr, sizeof hdr, MSG_NOSIGNAL) == (ssize_t)sizeof hdr);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    k = recv(fd, &c, 1, 0);
    EXPECT(k == 0 || (k < 0 && errno == ECONNRESET));
    close(fd);
    struct pair p = mkpair(8, 8, 0);
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    fill(A.buf, 512, 12);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 1, A.buf, 512, A.mr->lkey, rd(0), B.mr->rkey, IBV_SEND_SIGNALED, 0), 0);
    struct ibv_wc wc;
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.status == IBV_WC_SUCCESS && matches(B.buf, 512, 12));
    destroy_pair(&p);
    end();
}

int fake_ibv_live_dmabuf_mrs(void);

static void test_dmabuf(void)
{
    begin("ibv_reg_dmabuf_mr: the NIC maps the fd itself; data lands in the file; the mapping goes at dereg");
    long pg = sysconf(_SC_PAGESIZE);
    int fd = memfd_create("check-dmabuf", MFD_CLOEXEC);
    REQ(fd >= 0 && ftruncate(fd, 4 * pg) == 0);
    int full = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
    uint64_t iova = 0x7e0000000000ull, off = (uint64_t)pg + 100;
    struct ibv_mr *mr = ibv_reg_dmabuf_mr(B.pd, off, 512, iova, fd, full);
    REQ(mr);
    EXPECT((uintptr_t)mr->addr == off && mr->length == 512 && mr->lkey != mr->rkey);
    EXPECT_EQ(fake_ibv_live_dmabuf_mrs(), 1);
    EXPECT(ibv_reg_dmabuf_mr(B.pd, 4 * pg - 10, 512, iova, fd, full) == NULL && errno == EINVAL);
    close(fd); /* the registration keeps what it needs */
    struct pair p = mkpair(8, 8, 0);
    EXPECT_EQ(connect_pair(&p, NULL, NULL), 0);
    fill(A.buf, 512, 21);
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 1, A.buf, 512, A.mr->lkey, iova, mr->rkey, IBV_SEND_SIGNALED, 0), 0);
    struct ibv_wc wc;
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.status == IBV_WC_SUCCESS);
    /* past the MR's end: a remote access error */
    EXPECT_EQ(post_wr(p.a, IBV_WR_RDMA_WRITE, 2, A.buf, 16, A.mr->lkey, iova + 500, mr->rkey, IBV_SEND_SIGNALED, 0),
              0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.status == IBV_WC_REM_ACCESS_ERR);
    destroy_pair(&p);
    /* what landed is in the file (seen through a mapping of our own) */
    int fd2 = memfd_create("check-dmabuf-2", MFD_CLOEXEC);
    REQ(fd2 >= 0 && ftruncate(fd2, 4 * pg) == 0);
    struct ibv_mr *mr2 = ibv_reg_dmabuf_mr(B.pd, 0, (size_t)pg, 0x1000, fd2, full);
    REQ(mr2);
    char *view = mmap(NULL, (size_t)pg, PROT_READ, MAP_SHARED, fd2, 0);
    REQ(view != MAP_FAILED);
    struct pair q = mkpair(8, 8, 0);
    EXPECT_EQ(connect_pair(&q, NULL, NULL), 0);
    fill(A.buf, 256, 22);
    EXPECT_EQ(post_wr(q.a, IBV_WR_RDMA_WRITE, 3, A.buf, 256, A.mr->lkey, 0x1000 + 64, mr2->rkey, IBV_SEND_SIGNALED, 0),
              0);
    EXPECT_EQ(wait_wc(A.cq, &wc, 3000), 1);
    EXPECT(wc.status == IBV_WC_SUCCESS && matches((const unsigned char *)view + 64, 256, 22));
    destroy_pair(&q);
    munmap(view, (size_t)pg);
    close(fd2);
    EXPECT_EQ(ibv_dereg_mr(mr), 0);
    EXPECT_EQ(ibv_dereg_mr(mr2), 0);
    EXPECT_EQ(fake_ibv_live_dmabuf_mrs(), 0);
    end();
}

static void test_cleanup(void)
{
    begin("cleanup: live counts return to 0; ibv_close_device frees what is left on a context");
    EXPECT_EQ(ibv_dereg_mr(A.mr), 0);
    EXPECT_EQ(ibv_dereg_mr(B.mr), 0);
    EXPECT_EQ(ibv_destroy_cq(A.cq), 0);
    EXPECT_EQ(ibv_destroy_cq(B.cq), 0);
    EXPECT_EQ(ibv_dealloc_pd(A.pd), 0);
    EXPECT_EQ(ibv_dealloc_pd(B.pd), 0);
    EXPECT_EQ(ibv_close_device(A.ctx), 0);
    /* leave objects on B's context: close_device tears them down */
    struct ibv_pd *pd = ibv_alloc_pd(B.ctx);
    struct ibv_cq *cq = ibv_create_cq(B.ctx, 8, NULL, NULL, 0);
    REQ(pd && cq);
    struct ibv_mr *mr = ibv_reg_mr(pd, B.buf, 4096, IBV_ACCESS_LOCAL_WRITE);
    struct ibv_qp *qp = mkqp(pd, cq, 4, 4, 0, 0);
    REQ(mr && qp);
    struct linkopt o = LDEF;
    o.sgid = 0;
    EXPECT_EQ(qp_connect(qp, &B.gid, 0, qp->qp_num, IBV_MTU_2048, &o), 0); /* loopback to itself */
    EXPECT_EQ(fake_ibv_live_qps(), 1);
    EXPECT_EQ(ibv_close_device(B.ctx), 0);
    EXPECT_EQ(fake_ibv_live_qps(), 0);
    EXPECT_EQ(fake_ibv_live_mrs(), 0);
    EXPECT_EQ(fake_ibv_live_cqs(), 0);
    EXPECT_EQ(fake_ibv_live_pds(), 0);
    EXPECT_EQ(fake_ibv_live_contexts(), 0);
    free(A.buf);
    free(B.buf);
    end();
}

int main(void)
{
    alarm(60);
    unsetenv("FAKE_IBV_DELAY_US");
    unsetenv("FAKE_IBV_MAX_QP_WR");
    unsetenv("FAKE_IBV_MAX_CQE");
    run_env_children(); /* before this process reads its configuration */

    setenv("FAKE_IBV_DEVICES", "fa:ip=127.0.0.11:mtu=4096,fb:ip=127.0.0.12:mtu=2048", 1);
    double t0 = now_s();
    test_devices();
    test_memory();
    test_qp_state_machine();
    test_data_path();
    test_channel();
    test_cross_process();
    test_garbage();
    test_dmabuf();
    test_cleanup();
    if (g_failed) {
        fprintf(stderr, "check_fake_ibverbs: %d of %d checks FAILED\n", g_failed, g_checks);
        return 1;
    }
    fprintf(stderr, "check_fake_ibverbs: all %d checks passed (%.2f s)\n", g_checks, now_s() - t0);
    return 0;
}
