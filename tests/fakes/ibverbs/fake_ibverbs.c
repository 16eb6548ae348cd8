/*
 * fake_ibverbs.c - a FAKE of the RDMA verbs library (libibverbs.so.1) for
 * tests on machines without an RDMA NIC: a software model of an RC-capable
 * NIC (modelled on mlx5) that really moves data, between QPs of one process
 * and between processes of one host.
 *
 * It is compiled against the real <infiniband/verbs.h> and exports the real
 * entry points with the real ABI, so a harness written against libibverbs
 * (the plugin through dlopen(NIXL_MOONCAKE_IBVERBS_LIB), Python through
 * ctypes, C programs linked to it) runs on it unchanged. The inline data-path
 * functions of verbs.h (ibv_post_send, ibv_post_recv, ibv_poll_cq,
 * ibv_req_notify_cq) call through context->ops, which every context fills.
 * Extended verbs are not supported: context->abi_compat is NULL, so
 * verbs_get_ctx() returns NULL and the header's inline ibv_query_port() falls
 * back to the exported compat ibv_query_port(); ibv_query_device_ex() etc.
 * fall back to their legacy paths or return EOPNOTSUPP.
 *
 * Exported verbs: ibv_get_device_list, ibv_free_device_list,
 * ibv_get_device_name, ibv_get_device_guid, ibv_open_device,
 * ibv_close_device, ibv_query_device, ibv_query_port (compat struct),
 * ibv_query_gid, _ibv_query_gid_ex, _ibv_query_gid_table, ibv_query_pkey,
 * ibv_alloc_pd, ibv_dealloc_pd, ibv_reg_mr, ibv_reg_mr_iova,
 * ibv_reg_mr_iova2, ibv_reg_dmabuf_mr, ibv_dereg_mr, ibv_create_comp_channel,
 * ibv_destroy_comp_channel, ibv_create_cq, ibv_destroy_cq, ibv_get_cq_event,
 * ibv_ack_cq_events, ibv_create_qp, ibv_modify_qp, ibv_query_qp,
 * ibv_destroy_qp, ibv_wc_status_str, ibv_fork_init (returns 0).
 *
 * What is modelled
 *  - Devices (FAKE_IBV_DEVICES, below), each with one port (port 1), node type
 *    IBV_NODE_CA, transport IBV_TRANSPORT_IB, vendor 0x02c9 (part 4119),
 *    node GUID = port GUID derived from the name (Mellanox OUI 24:8a:07).
 *    ibv_query_device: max_qp 65536, max_qp_wr FAKE_IBV_MAX_QP_WR, max_sge 30,
 *    max_cqe FAKE_IBV_MAX_CQE, max_mr 2^20, max_qp_rd_atom 16, max_mr_size
 *    from the spec, atomic_cap IBV_ATOMIC_NONE, max_srq 0 (no SRQ, no
 *    atomics). RoCE (ll=eth) port: link layer ETHERNET, lid 0, pkey table of
 *    1, GID table of 4 entries, all with ndev_ifindex = if_nametoindex("lo"):
 *      0: fe80::<ip as the last 4 bytes>  ROCE_V1     1: same, ROCE_V2
 *      2: ::ffff:<ip>                       ROCE_V1     3: same, ROCE_V2
 *    IB (ll=ib) port: link layer INFINIBAND, lid from the spec, sm_lid 1,
 *    pkey table of 128 (index 0 = 0xffff, the rest 0), one GID
 *    fe80::/64 + port GUID, type IB. Port state DOWN while the spec says
 *    state=down or fake_ibv_drop_link() holds the link down. ibv_query_gid /
 *    _ibv_query_gid_ex on an index past the table: -1 / EINVAL.
 *    ibdev_path is a sysfs look-alike created per process,
 *    $TMPDIR (or /tmp)/fake-ibv-<pid>/<name>, holding device/numa_node;
 *    removed at exit by the creating process (trees of processes that died
 *    without exiting normally are swept by the next process that configures).
 *  - Objects: contexts (ops.poll_cq, req_notify_cq, post_send, post_recv set;
 *    cmd_fd = /dev/null, async_fd = an eventfd that never fires,
 *    num_comp_vectors 4), PDs, MRs, completion channels, CQs, RC QPs. Every
 *    public field of the returned structs is filled. Errors return NULL or
 *    nonzero with errno set like the real library: EINVAL for bad arguments,
 *    ENOMEM past limits, EBUSY for ibv_dealloc_pd with live MRs/QPs,
 *    ibv_destroy_cq with attached QPs or unacknowledged events (the real
 *    library blocks there instead), ibv_destroy_comp_channel with CQs.
 *    ibv_close_device destroys whatever still lives on the context (as the
 *    kernel does when the device fd closes) and returns 0.
 *  - MRs: ibv_reg_mr (iova = addr), ibv_reg_mr_iova/_iova2, and
 *    ibv_reg_dmabuf_mr (GPUDirect RDMA: the fd, e.g. fake CUDA's export of
 *    device memory, is mapped by the fake NIC itself, so the owner's view of
 *    the memory may be inaccessible to the CPU; mr->addr reports the offset,
 *    as rdma-core does; EINVAL when offset+length passes the fd's size,
 *    EOPNOTSUPP while FAKE_IBV_NO_DMABUF is set or fake_ibv_refuse_dmabuf(1)
 *    holds). All addresses
 *    through an MR, local SGEs included, are in its iova space, as on mlx5.
 *    Length 0 or > max_mr_size, REMOTE_WRITE/REMOTE_ATOMIC without
 *    LOCAL_WRITE, ON_DEMAND/ZERO_BASED or unknown flags: EINVAL. Optional
 *    flags (IBV_ACCESS_RELAXED_ORDERING, ...) are accepted. The range must be
 *    mapped readable (and writable when a write access is asked), checked in
 *    /proc/self/maps: else EFAULT, as the kernel's page pinning (so PROT_NONE
 *    memory, e.g. fake CUDA device pointers, cannot be registered: no
 *    GPUDirect). lkey != rkey, both unique per device and never reused in a
 *    process run (lkeys even, rkeys odd). Per device the MR table is under a
 *    rwlock: data movement holds it for reading while it copies (at most
 *    256 KiB at a time), so ibv_dereg_mr waits for copies in progress and the
 *    keys are invalid once it returns.
 *  - CQs: ring of 2^k-1 >= cqe entries (cq->cqe reports it). Polling returns
 *    entries in order. ibv_req_notify_cq arms: the next completion added
 *    writes one event to the channel and disarms (solicited_only is treated
 *    as any). Ring full: the completion is lost, counted
 *    (fake_ibv_cq_overruns) and one line per CQ goes to stderr.
 *  - Completion channels: fd is one end of a socketpair, readable while an
 *    event is pending; ibv_get_cq_event blocks (or -1/EAGAIN when the fd is
 *    O_NONBLOCK); events of a destroyed CQ are discarded.
 *  - QPs: IBV_QPT_RC only (else EINVAL), no SRQ (EINVAL). max_send_wr and
 *    max_recv_wr <= max_qp_wr, rounded up to a power of two and reported in
 *    init_attr->cap; max_send_sge/max_recv_sge <= 30 and max_inline_data <=
 *    256 reported as asked. QPN = slot << 12 | lowest free index (so at most
 *    4096 live QPs per device per process: ENOMEM past that). States and the
 *    attribute masks follow the kernel's table for RC (required and optional
 *    bits; other bits: EINVAL): RESET->INIT needs PKEY_INDEX|PORT|
 *    ACCESS_FLAGS; INIT->RTR AV|PATH_MTU|DEST_QPN|RQ_PSN|MAX_DEST_RD_ATOMIC|
 *    MIN_RNR_TIMER; RTR->RTS TIMEOUT|RETRY_CNT|RNR_RETRY|SQ_PSN|
 *    MAX_QP_RD_ATOMIC; INIT->INIT, RTS->RTS; any->RESET and any->ERR take
 *    STATE only. port_num and ah_attr.port_num must be 1; on RoCE the AV
 *    needs is_global = 1 and sgid_index < 4; path_mtu above the port's
 *    active MTU, rd_atomic > 16, timeout > 31, retry_cnt/rnr_retry > 7:
 *    EINVAL. ibv_query_qp returns the state and stored attributes and, like
 *    libibverbs, refreshes qp->state (which is otherwise only changed by
 *    ibv_modify_qp: an error completion moves the QP to ERR behind it).
 *  - Posting (errors return EINVAL/ENOMEM with *bad_wr set): post_send in
 *    RESET/INIT/RTR: EINVAL; in ERR: accepted and completed with
 *    IBV_WC_WR_FLUSH_ERR. Opcodes RDMA_WRITE, RDMA_WRITE_WITH_IMM, SEND,
 *    SEND_WITH_IMM, RDMA_READ (others EINVAL). num_sge > max_send_sge: EINVAL.
 *    IBV_SEND_INLINE copies the data at post time (total <= max_inline_data,
 *    not for READ, lkeys not checked). Send-queue slots are freed as on mlx5:
 *    when a CQE of that WR or of a later WR of the QP is POLLED; posting more
 *    than max_send_wr unfreed WRs gives ENOMEM (so a QP that never signals
 *    fills up, as on hardware). post_recv likewise (RESET: EINVAL; ERR:
 *    flushed). Zero-length SGEs are skipped (not checked), as mlx5 does.
 *  - Execution: one requester thread per QP (started at the first RTS)
 *    executes the send queue strictly in order, one WR at a time: a WR's CQE
 *    is generated only after the responder has answered, so a successful
 *    completion means the data is in the responder's memory (and a later WR
 *    of the QP starts only after that). Local checks when a WR runs: each
 *    SGE's lkey names an MR of the QP's PD on this device with the range
 *    inside it (LOCAL_WRITE for READ destinations and receive buffers), else
 *    IBV_WC_LOC_PROT_ERR; a message > 1 GiB (max_msg_sz): IBV_WC_LOC_LEN_ERR.
 *    Successful send WRs give a CQE only when signaled (IBV_SEND_SIGNALED or
 *    sq_sig_all); errors and flushes always do. wc: wr_id, status, opcode,
 *    byte_len (READ and receives; RDMA_WRITE_WITH_IMM: the write's length),
 *    imm_data as posted, wc_flags IBV_WC_WITH_IMM, qp_num, src_qp (receives:
 *    the sender's QPN). When a QP enters ERR (an error completion, the
 *    responder side of a failed request, or ibv_modify_qp) every outstanding
 *    send WR (including one in flight) and every posted receive completes in
 *    order with IBV_WC_WR_FLUSH_ERR. Modify to RESET drops outstanding WRs
 *    WITHOUT completions and removes the QP's unpolled CQEs from its CQs (as
 *    mlx5 does; a classic bug source); so does ibv_destroy_qp.
 *  - Soft NIC: per device per process one listening Unix stream socket in the
 *    abstract namespace, "\0fake-ibv:<key>:<slot>", key = the RoCE IPv4
 *    ("127.0.0.2") or "lid<N>" for IB, bound at the first ibv_open_device of
 *    the device with slot = getpid() % 4095 + 1 or the next free one
 *    (wrapping), so slots are unique among live processes. A requester finds
 *    its responder from the RTR address: key = last 4 bytes of the dgid
 *    (RoCE; fe80::ip and ::ffff:ip GIDs both work) or the dlid (IB), slot =
 *    dest_qp_num >> 12. Each requester QP opens its own connection lazily and
 *    keeps it; a listener thread per device starts one thread per connection
 *    that serves its requests in order (blocking I/O, no polling loops).
 *    Every request carries the requester's address, QPN and PSN and the
 *    destination QPN; the responder executes it only when the destination QP
 *    is in RTR/RTS, connected back to exactly that (address, QPN), and the PSN
 *    is the one it expects (rq_psn, +1 per executed request; the requester's
 *    count starts at sq_psn). The PSN just before it is a duplicate (a
 *    retransmission): answered again without executing (READs re-executed),
 *    as IB does. Anything else (stale, misrouted, mismatched PSNs) is dropped
 *    without an answer. Data are copied with
 *    memcpy by the process owning the memory (the responder for WRITE/SEND,
 *    the requester for the READ answer) under that device's MR rwlock.
 *      WRITE(_WITH_IMM): responder QP needs IBV_ACCESS_REMOTE_WRITE in
 *        qp_access_flags (else IBV_WC_REM_INV_REQ_ERR), the rkey an MR of the
 *        QP's PD with REMOTE_WRITE covering [raddr, raddr+len) in iova space
 *        (else IBV_WC_REM_ACCESS_ERR; zero-length: not checked). WITH_IMM
 *        consumes a posted receive (IBV_WC_RECV_RDMA_WITH_IMM).
 *      READ: REMOTE_READ in qp_access_flags and max_dest_rd_atomic > 0 (else
 *        REM_INV_REQ_ERR), an MR with REMOTE_READ covering the range (else
 *        REM_ACCESS_ERR).
 *      SEND(_WITH_IMM): consumes the next posted receive (IBV_WC_RECV);
 *        message longer than its buffers: receiver IBV_WC_LOC_LEN_ERR,
 *        requester REM_INV_REQ_ERR; bad receive lkey: receiver LOC_PROT_ERR,
 *        requester REM_OP_ERR.
 *      No posted receive: RNR NAK; the requester waits the responder's
 *        min_rnr_timer (IB table, at least 1 ms) and retries; rnr_retry 7 =
 *        forever, else after rnr_retry retries IBV_WC_RNR_RETRY_EXC_ERR.
 *      Remote errors move both QPs to ERR (flushing the rest).
 *      No answer (responder QP gone / not ready / connected elsewhere, peer
 *        process gone, link down): the requester retransmits every
 *        4.096 us * 2^timeout (at least 2 ms) up to retry_cnt times, then
 *        IBV_WC_RETRY_EXC_ERR; the total is capped at 1 s (timeout 0, which
 *        means infinite on hardware, also gives the 1 s cap). The timer
 *        restarts whenever bytes move, so big transfers do not time out.
 *    Peer input is never trusted: a malformed request drops the connection.
 *    All sends use MSG_NOSIGNAL; fake threads block all signals; idle threads
 *    sleep in blocking calls (0% CPU). ibv_destroy_qp joins the QP's
 *    requester thread (it returns promptly, even during a timeout wait) and
 *    waits for a request being served to it; connection threads exit when
 *    their socket closes. Nothing is joined at exit, so exiting with live
 *    objects does not hang.
 *  - fork(): as with the real library the child must not use the parent's
 *    verbs objects; in the child the fake forgets them (closes the inherited
 *    sockets, counters start at 0) and the devices can be opened anew (new
 *    slot, new listener). The configuration is inherited, not re-read.
 *
 * Environment (read once, at the first ibv_get_device_list/ibv_open_device
 * or test control call)
 *  FAKE_IBV_DEVICES   comma-separated device specs "name[:key=value...]":
 *                       ll=eth|ib     link layer (default eth)
 *                       ip=A.B.C.D    IPv4 of the RoCE GIDs (default
 *                                     127.0.0.<1 + index in the list>)
 *                       lid=N         IB LID (default 1 + index)
 *                       mtu=256|512|1024|2048|4096  active = max MTU (4096)
 *                       numa=N        device/numa_node (default 0)
 *                       state=active|down  port state (default active)
 *                       maxmr=BYTES   max_mr_size (default 1 TiB; k/m/g/t
 *                                     suffixes allowed)
 *                     unset: "fake_mlx5_0,fake_mlx5_1"; set but empty: no
 *                     devices (an empty list, *num = 0).
 *  FAKE_IBV_MAX_QP_WR (default 1024), FAKE_IBV_MAX_CQE (default 65536)
 *  FAKE_IBV_DELAY_US  each executed send WR first waits this long (default 0)
 *
 * Test controls (exported, not part of libibverbs; "dev" is a device name)
 *  uint64_t fake_ibv_bytes(const char *dev, int served)
 *        payload bytes of successful requests this process's device
 *        initiated (served = 0: WRITE/SEND sent, READ received) or executed
 *        as responder (served = 1); unknown device: 0.
 *  void fake_ibv_refuse_dmabuf(int refuse)   ibv_reg_dmabuf_mr fails while set.
 *  int fake_ibv_refused_registrations(void)  ibv_reg_*mr* calls that failed.
 *  int fake_ibv_live_qps(void), fake_ibv_live_mrs(void), fake_ibv_live_dmabuf_mrs(void),
 *      fake_ibv_live_cqs(void), fake_ibv_live_pds(void),
 *      fake_ibv_live_contexts(void)
 *        objects of this process not yet destroyed.
 *  uint64_t fake_ibv_cq_overruns(void)   completions lost to full CQs.
 *  void fake_ibv_drop_link(const char *dev, int dropped)
 *        while dropped, every request from or to that device of this process
 *        gets no answer (requesters end with IBV_WC_RETRY_EXC_ERR) and the
 *        port reports IBV_PORT_DOWN, like a pulled cable.
 *  void fake_ibv_set_delay_us(unsigned us)   as FAKE_IBV_DELAY_US.
 *  void fake_ibv_corrupt_rkeys(unsigned n)
 *        the next n RDMA WRITE/READ WRs (with a non-zero length: zero-length
 *        ones never check rkeys) this process executes carry a wrong rkey.
 *  int fake_ibv_slot(const char *dev)
 *        this process's slot on that device (0 before the device is first
 *        opened, -1 for an unknown device).
 *
 * Not modelled: UD/UC/XRC QPs, SRQs, atomics, memory windows, async events,
 * extended verbs (ibv_*_ex), SQD, alternate paths (accepted, ignored),
 * multi-packet PSN accounting (one PSN per message on both sides), rereg_mr,
 * GPUDirect.
 */
#define _GNU_SOURCE
#include <infiniband/verbs.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* verbs.h turns these names into macros around inline helpers; the library
 * itself exports the real functions. */
#undef ibv_get_device_list
#undef ibv_query_port
#undef ibv_reg_mr
#undef ibv_reg_mr_iova

#define FV_API __attribute__((visibility("default")))

/* The exported ibv_query_port fills the old (compat) layout: struct
 * ibv_port_attr without port_cap_flags2. The header only declares it. */
struct _compat_ibv_port_attr {
    enum ibv_port_state state;
    enum ibv_mtu max_mtu;
    enum ibv_mtu active_mtu;
    int gid_tbl_len;
    uint32_t port_cap_flags;
    uint32_t max_msg_sz;
    uint32_t bad_pkey_cntr;
    uint32_t qkey_viol_cntr;
    uint16_t pkey_tbl_len;
    uint16_t lid;
    uint16_t sm_lid;
    uint8_t lmc;
    uint8_t max_vl_num;
    uint8_t sm_sl;
    uint8_t subnet_timeout;
    uint8_t init_type_reply;
    uint8_t active_width;
    uint8_t active_speed;
    uint8_t phys_state;
    uint8_t link_layer;
    uint8_t flags;
};

/* ------------------------------------------------------------------------ */
/* Limits and wire format                                                    */
/* ------------------------------------------------------------------------ */
#define FV_MAX_DEVS 32
#define FV_SLOTS 4095
#define FV_QPS_PER_DEV 4096
#define FV_MR_HASH 4096
#define FV_CHUNK (256u * 1024u)
#define FV_MAX_MSG (1u << 30)
#define FV_MAX_INLINE 256u
#define FV_MAX_SGE 30
#define FV_MAX_RD_ATOM 16
#define FV_MAX_MR (1 << 20)
#define FV_COMP_VECTORS 4
#define FV_FDS 65536
#define FV_ROCE_GIDS 4
#define FV_IB_PKEYS 128
#define FV_STACK (256 * 1024)

#define REQ_MAGIC 0x52564946u /* "FIVR" */
#define ANS_MAGIC 0x41564946u /* "FIVA" */

enum { OP_WRITE = 1, OP_WRITE_IMM, OP_SEND, OP_SEND_IMM, OP_READ };
enum { A_OK = 0, A_RNR, A_ACCESS, A_INV_REQ, A_OP_ERR };

struct wreq {
    uint32_t magic;
    uint8_t op;
    uint8_t pad[3];
    uint32_t src_qpn, dst_qpn, psn, rkey, imm, pad2;
    uint64_t src_key, seq, raddr, len;
}; /* followed by len payload bytes unless op == OP_READ */
_Static_assert(sizeof(struct wreq) == 64, "wreq");

struct wans {
    uint32_t magic;
    uint8_t status, rnr_timer, has_data, pad;
    uint64_t seq;
    uint64_t len;
}; /* has_data (READ): frames follow: {n > 0, 0} + n bytes ..., {0, status} */
_Static_assert(sizeof(struct wans) == 24, "wans");

struct wframe {
    uint32_t len;
    uint32_t status;
};

/* ------------------------------------------------------------------------ */
/* Objects                                                                   */
/* ------------------------------------------------------------------------ */
struct fqp;
struct fpd;

struct fmr {
    struct ibv_mr mr;
    struct fdev *d;
    struct fpd *pd;
    char *host;       /* where the NIC reaches iova: the user's address, or
                         our own mapping of a dmabuf */
    size_t map_len;   /* that mapping's length (dmabuf MRs), else 0 */
    uint64_t iova;
    unsigned access;
    struct fmr *lnext, *rnext; /* hash chains, under d->mr_rw */
    struct fmr *cnext;         /* context list, under ctx->mu */
};

struct fdev {
    struct ibv_device ibdev; /* first: the public pointer is a struct fdev * */
    int index;
    /* configuration (immutable once parsed) */
    int is_ib;
    uint8_t ip[4];
    uint16_t lid;
    enum ibv_mtu mtu;
    int numa;
    int cfg_down;
    uint64_t maxmr;
    uint64_t guid; /* host order */
    uint64_t key;  /* routing key: IPv4 as a number, or 1 << 32 | lid */
    /* runtime */
    pthread_mutex_t mu; /* started, slot, lfd, qps[], refs, key_ctr, nmr */
    pthread_cond_t cv;  /* a QP reference was dropped */
    int started, slot, lfd;
    struct fqp *qps[FV_QPS_PER_DEV];
    uint32_t key_ctr, key_base;
    int nmr;
    pthread_rwlock_t mr_rw;
    struct fmr *by_lkey[FV_MR_HASH], *by_rkey[FV_MR_HASH];
    atomic_ullong bytes_out, bytes_in;
    atomic_int dropped;
};

struct fctx {
    struct ibv_context ctx;
    struct fdev *d;
    pthread_mutex_t mu; /* object lists, pd refs, channel refcnt */
    struct fpd *pds;
    struct fmr *mrs;
    struct fcq *cqs;
    struct fch *chs;
    struct fqp *qps;
};

struct fpd {
    struct ibv_pd pd;
    struct fctx *c;
    struct fpd *cnext;
    int refs; /* MRs + QPs, under c->mu */
};

struct evnode {
    struct evnode *next;
    struct fcq *cq;
};

struct fch {
    struct ibv_comp_channel ch; /* ch.fd: read end of a socketpair */
    struct fctx *c;
    struct fch *cnext;
    int wfd;
    pthread_mutex_t mu; /* event queue, cq->ev_reported */
    struct evnode *head, *tail;
};

struct cqe_ent {
    struct ibv_wc wc;
    struct fqp *qp;
    uint64_t seq;
    int is_send;
};

struct fcq {
    struct ibv_cq cq;
    struct fctx *c;
    struct fch *ch;
    struct fcq *cnext;
    pthread_mutex_t mu; /* ring, armed, nqp */
    struct cqe_ent *ring;
    int cap, head, count;
    int armed, overrun_said, nqp;
    uint64_t ev_reported; /* under ch->mu */
    atomic_ullong ev_acked;
};

struct swr {
    uint64_t wr_id, seq, raddr;
    uint32_t rkey, imm, inl_len;
    int opcode, num_sge;
    unsigned flags;
    int signaled;
};

struct rwr {
    uint64_t wr_id, seq;
    int num_sge;
    int reserved; /* being filled by an incoming request */
};

struct fqp {
    struct ibv_qp qp;
    struct fctx *c;
    struct fdev *d;
    struct fpd *pd;
    struct fcq *scq, *rcq;
    struct fqp *cnext;
    int idx;
    pthread_mutex_t mu; /* everything below unless noted */
    pthread_cond_t cv;  /* requester: work or stop */
    int st;
    atomic_ullong gen; /* bumped (under mu) by RESET/ERR: in-flight work is stale */
    atomic_int stop;
    uint32_t cap_sw, cap_rw, cap_ss, cap_rs, cap_inl;
    int sig_all;
    struct ibv_qp_attr a; /* stored attributes */
    uint64_t dest_key;
    int dest_slot;
    uint32_t next_psn, exp_psn;
    struct swr *sq;
    struct ibv_sge *sq_sge;
    uint8_t *sq_inl;
    uint32_t sq_head, sq_count;
    uint64_t sq_posted;
    atomic_ullong sq_freed;
    struct rwr *rq;
    struct ibv_sge *rq_sge;
    uint32_t rq_head, rq_count;
    uint64_t rq_posted;
    atomic_ullong rq_freed;
    pthread_t thr;
    int thr_started;
    int wake_fd;           /* eventfd: interrupts the requester's waits */
    pthread_mutex_t resp_mu; /* serialises requests served to this QP */
    int serving_fd;        /* connection being served (under mu) */
    int refs;              /* under d->mu */
};

/* ------------------------------------------------------------------------ */
/* Globals                                                                   */
/* ------------------------------------------------------------------------ */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_configured;
static int g_ndev;
static struct fdev *g_devs;
static int g_max_qp_wr = 1024;
static int g_max_cqe = 65536;
static atomic_uint g_delay_us;
static atomic_uint g_corrupt;
static atomic_ullong g_overruns;
static atomic_int g_live_qps, g_live_mrs, g_live_cqs, g_live_pds, g_live_ctx, g_live_dmabuf_mrs;
static atomic_int g_no_dmabuf; /* fake_ibv_refuse_dmabuf */
static atomic_int g_reg_refused; /* registrations that failed */
static char g_dir[PATH_MAX];
static pid_t g_dir_pid;
static atomic_uchar g_fdreg[FV_FDS]; /* fds owned by the fake (closed in a fork child) */

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */
static void fv_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fv_warn(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fake_ibverbs: %s\n", line);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void fd_reg(int fd)
{
    if (fd >= 0 && fd < FV_FDS)
        atomic_store(&g_fdreg[fd], 1);
}

static void fd_close(int fd)
{
    if (fd < 0)
        return;
    if (fd < FV_FDS)
        atomic_store(&g_fdreg[fd], 0);
    close(fd);
}

static void *xcalloc(size_t n, size_t sz)
{
    return calloc(n ? n : 1, sz ? sz : 1);
}

/* Starts a thread with every signal blocked and a small stack. */
static int spawn(pthread_t *out, void *(*fn)(void *), void *arg, int detached)
{
    sigset_t all, old;
    pthread_attr_t at;
    pthread_t t;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, FV_STACK);
    if (detached)
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(out ? out : &t, &at, fn, arg);
    pthread_attr_destroy(&at);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

static void atomic_max(atomic_ullong *v, uint64_t x)
{
    unsigned long long cur = atomic_load(v);
    while (cur < x && !atomic_compare_exchange_weak(v, &cur, x)) {
    }
}

static uint32_t pow2_at_least(uint32_t x)
{
    uint32_t p = 1;
    while (p < x && p < (1u << 31))
        p <<= 1;
    return p;
}

/* blocking I/O (responder side) */
static int read_full(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n) {
        ssize_t k = recv(fd, p, n, 0);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        return -1;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        return -1;
    }
    return 0;
}

static int mtu_bytes(enum ibv_mtu m) { return 128 << m; }

static int dev_down(struct fdev *d) { return d->cfg_down || atomic_load(&d->dropped); }

static void route_addr(struct sockaddr_un *a, socklen_t *len, uint64_t key, int slot)
{
    char name[96];
    int n;
    if (key >> 32)
        n = snprintf(name, sizeof name, "fake-ibv:lid%u:%d", (unsigned)(key & 0xffff), slot);
    else
        n = snprintf(name, sizeof name, "fake-ibv:%u.%u.%u.%u:%d", (unsigned)(key >> 24) & 255,
                     (unsigned)(key >> 16) & 255, (unsigned)(key >> 8) & 255, (unsigned)key & 255, slot);
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    memcpy(a->sun_path + 1, name, (size_t)n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

/* ------------------------------------------------------------------------ */
/* Configuration                                                             */
/* ------------------------------------------------------------------------ */
static int parse_u64(const char *s, uint64_t *out, int suffixes)
{
    char *e;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 0);
    if (errno || e == s || *s == '-')
        return -1;
    if (suffixes && *e) {
        int sh = 0;
        switch (*e) {
        case 'k': case 'K': sh = 10; break;
        case 'm': case 'M': sh = 20; break;
        case 'g': case 'G': sh = 30; break;
        case 't': case 'T': sh = 40; break;
        default: return -1;
        }
        e++;
        if (v > (~0ull >> sh))
            return -1;
        v <<= sh;
    }
    if (*e)
        return -1;
    *out = v;
    return 0;
}

static int env_int(const char *name, int def, int lo, int hi)
{
    const char *s = getenv(name);
    uint64_t v;
    if (!s || !*s)
        return def;
    if (parse_u64(s, &v, 0) || v < (uint64_t)lo || v > (uint64_t)hi) {
        fv_warn("%s=%s is not a number in [%d, %d]; using %d", name, s, lo, hi, def);
        return def;
    }
    return (int)v;
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

static int valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= 64)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '-' || *s == '.'))
            return 0;
    return 1;
}

static void parse_device(char *tok)
{
    char *save = NULL;
    char *name = strtok_r(tok, ":", &save);
    if (!name || !*name)
        return;
    if (!valid_name(name)) {
        fv_warn("FAKE_IBV_DEVICES: bad device name '%s' ignored", name);
        return;
    }
    if (g_ndev >= FV_MAX_DEVS) {
        fv_warn("FAKE_IBV_DEVICES: more than %d devices; '%s' ignored", FV_MAX_DEVS, name);
        return;
    }
    struct fdev *d = &g_devs[g_ndev];
    d->index = g_ndev;
    snprintf(d->ibdev.name, sizeof d->ibdev.name, "%s", name);
    d->is_ib = 0;
    d->ip[0] = 127;
    d->ip[1] = 0;
    d->ip[2] = 0;
    d->ip[3] = (uint8_t)(1 + g_ndev);
    d->lid = (uint16_t)(1 + g_ndev);
    d->mtu = IBV_MTU_4096;
    d->numa = 0;
    d->cfg_down = 0;
    d->maxmr = 1ull << 40;
    for (char *kv = strtok_r(NULL, ":", &save); kv; kv = strtok_r(NULL, ":", &save)) {
        char *eq = strchr(kv, '=');
        uint64_t v;
        if (!eq) {
            fv_warn("FAKE_IBV_DEVICES: '%s' of %s is not key=value; ignored", kv, name);
            continue;
        }
        *eq = 0;
        const char *val = eq + 1;
        if (!strcmp(kv, "ll")) {
            if (!strcmp(val, "ib"))
                d->is_ib = 1;
            else if (!strcmp(val, "eth"))
                d->is_ib = 0;
            else
                fv_warn("FAKE_IBV_DEVICES: %s: ll=%s is not eth|ib", name, val);
        } else if (!strcmp(kv, "ip")) {
            struct in_addr in;
            if (inet_pton(AF_INET, val, &in) == 1)
                memcpy(d->ip, &in, 4);
            else
                fv_warn("FAKE_IBV_DEVICES: %s: ip=%s is not an IPv4 address", name, val);
        } else if (!strcmp(kv, "lid")) {
            if (!parse_u64(val, &v, 0) && v >= 1 && v <= 0xbfff)
                d->lid = (uint16_t)v;
            else
                fv_warn("FAKE_IBV_DEVICES: %s: lid=%s is not a unicast LID", name, val);
        } else if (!strcmp(kv, "mtu")) {
            int m = 0;
            if (!parse_u64(val, &v, 0))
                for (int i = IBV_MTU_256; i <= IBV_MTU_4096; i++)
                    if ((uint64_t)mtu_bytes((enum ibv_mtu)i) == v)
                        m = i;
            if (m)
                d->mtu = (enum ibv_mtu)m;
            else
                fv_warn("FAKE_IBV_DEVICES: %s: mtu=%s is not 256|512|1024|2048|4096", name, val);
        } else if (!strcmp(kv, "numa")) {
            if (!parse_u64(val, &v, 0) && v < 1024)
                d->numa = (int)v;
            else
                fv_warn("FAKE_IBV_DEVICES: %s: numa=%s is not a node number", name, val);
        } else if (!strcmp(kv, "state")) {
            if (!strcmp(val, "down"))
                d->cfg_down = 1;
            else if (!strcmp(val, "active"))
                d->cfg_down = 0;
            else
                fv_warn("FAKE_IBV_DEVICES: %s: state=%s is not active|down", name, val);
        } else if (!strcmp(kv, "maxmr")) {
            if (!parse_u64(val, &v, 1) && v > 0)
                d->maxmr = v;
            else
                fv_warn("FAKE_IBV_DEVICES: %s: maxmr=%s is not a size", name, val);
        } else {
            fv_warn("FAKE_IBV_DEVICES: %s: unknown key '%s' ignored", name, kv);
        }
    }
    for (int i = 0; i < g_ndev; i++)
        if (!strcmp(g_devs[i].ibdev.name, d->ibdev.name)) {
            fv_warn("FAKE_IBV_DEVICES: duplicate device name '%s' ignored", name);
            return;
        }
    g_ndev++;
}

static void write_sysfs(struct fdev *d)
{
    char p[PATH_MAX + 128];
    if (!g_dir[0])
        return;
    snprintf(p, sizeof p, "%s/%s", g_dir, d->ibdev.name);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/%s/device", g_dir, d->ibdev.name);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/%s/device/numa_node", g_dir, d->ibdev.name);
    FILE *f = fopen(p, "we");
    if (f) {
        fprintf(f, "%d\n", d->numa);
        fclose(f);
    }
}

/* removes a sysfs look-alike tree: <dir>/<name>/device/numa_node */
static void rm_sysfs_tree(const char *dir)
{
    char p[PATH_MAX + 600];
    DIR *dd = opendir(dir);
    if (dd) {
        struct dirent *e;
        while ((e = readdir(dd)) != NULL) {
            if (e->d_name[0] == '.')
                continue;
            snprintf(p, sizeof p, "%s/%s/device/numa_node", dir, e->d_name);
            unlink(p);
            snprintf(p, sizeof p, "%s/%s/device", dir, e->d_name);
            rmdir(p);
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            rmdir(p);
        }
        closedir(dd);
    }
    rmdir(dir);
}

/* trees left by processes that died without running the destructor */
static void sweep_stale_sysfs(const char *tmp)
{
    char p[PATH_MAX + 600];
    DIR *dd = opendir(tmp);
    if (!dd)
        return;
    struct dirent *e;
    while ((e = readdir(dd)) != NULL) {
        const char *s = e->d_name;
        if (strncmp(s, "fake-ibv-", 9) || !s[9])
            continue;
        char *end;
        long pid = strtol(s + 9, &end, 10);
        if (*end || pid <= 0 || pid == (long)getpid())
            continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        snprintf(p, sizeof p, "%s/%s", tmp, s);
        rm_sysfs_tree(p);
    }
    closedir(dd);
}

static void dev_init_runtime(struct fdev *d)
{
    pthread_rwlockattr_t ra;
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&d->mr_rw, &ra);
    pthread_rwlockattr_destroy(&ra);
    d->started = 0;
    d->slot = 0;
    d->lfd = -1;
    memset(d->qps, 0, sizeof d->qps);
    memset(d->by_lkey, 0, sizeof d->by_lkey);
    memset(d->by_rkey, 0, sizeof d->by_rkey);
    d->nmr = 0;
    uint32_t rnd[2] = {0, 0};
    if (getrandom(rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t)sizeof rnd) {
        rnd[0] = (uint32_t)now_ns() ^ (uint32_t)getpid() * 2654435761u;
        rnd[1] = (uint32_t)(now_ns() >> 17) * 40503u + (uint32_t)d->index;
    }
    d->key_base = rnd[0] & 0x7fffffffu;
    d->key_ctr = rnd[1];
    atomic_store(&d->bytes_out, 0);
    atomic_store(&d->bytes_in, 0);
    atomic_store(&d->dropped, 0);
}

static void configure_locked(void)
{
    if (g_configured)
        return;
    g_configured = 1;
    g_devs = calloc(FV_MAX_DEVS, sizeof *g_devs);
    if (!g_devs) {
        fv_warn("out of memory");
        return;
    }
    const char *env = getenv("FAKE_IBV_DEVICES");
    char *spec = strdup(env ? env : "fake_mlx5_0,fake_mlx5_1");
    if (spec) {
        char *save = NULL;
        for (char *tok = strtok_r(spec, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
            parse_device(tok);
        free(spec);
    }
    g_max_qp_wr = env_int("FAKE_IBV_MAX_QP_WR", 1024, 1, 1 << 20);
    g_max_cqe = env_int("FAKE_IBV_MAX_CQE", 65536, 1, 1 << 24);
    atomic_store(&g_delay_us, (unsigned)env_int("FAKE_IBV_DELAY_US", 0, 0, 60000000));

    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    if (g_ndev > 0)
        sweep_stale_sysfs(tmp);
    if (g_ndev > 0 && (size_t)snprintf(g_dir, sizeof g_dir, "%s/fake-ibv-%d", tmp, (int)getpid()) < 200) {
        if (mkdir(g_dir, 0755) == 0 || errno == EEXIST)
            g_dir_pid = getpid();
        else
            g_dir[0] = 0;
    } else {
        g_dir[0] = 0;
    }
    for (int i = 0; i < g_ndev; i++) {
        struct fdev *d = &g_devs[i];
        uint64_t h = fnv1a(d->ibdev.name);
        d->guid = (0x248a07ull << 40) | (h & 0xffffffffffull);
        d->key = d->is_ib ? ((1ull << 32) | d->lid)
                          : ((uint64_t)d->ip[0] << 24 | (uint64_t)d->ip[1] << 16 | (uint64_t)d->ip[2] << 8 | d->ip[3]);
        d->ibdev.node_type = IBV_NODE_CA;
        d->ibdev.transport_type = IBV_TRANSPORT_IB;
        snprintf(d->ibdev.dev_name, sizeof d->ibdev.dev_name, "uverbs%d", i);
        snprintf(d->ibdev.dev_path, sizeof d->ibdev.dev_path, "/sys/class/infiniband_verbs/uverbs%d", i);
        if (g_dir[0])
            snprintf(d->ibdev.ibdev_path, sizeof d->ibdev.ibdev_path, "%.180s/%s", g_dir, d->ibdev.name);
        else
            snprintf(d->ibdev.ibdev_path, sizeof d->ibdev.ibdev_path, "/sys/class/infiniband/%s", d->ibdev.name);
        dev_init_runtime(d);
        write_sysfs(d);
    }
}

static void configure(void)
{
    pthread_mutex_lock(&g_mu);
    configure_locked();
    pthread_mutex_unlock(&g_mu);
}

static struct fdev *dev_by_name(const char *name)
{
    configure();
    if (!name)
        return NULL;
    for (int i = 0; i < g_ndev; i++)
        if (!strcmp(g_devs[i].ibdev.name, name))
            return &g_devs[i];
    return NULL;
}

static struct fdev *dev_of(struct ibv_device *ib)
{
    configure();
    for (int i = 0; i < g_ndev; i++)
        if (&g_devs[i].ibdev == ib)
            return &g_devs[i];
    return NULL;
}

__attribute__((destructor)) static void fv_fini(void)
{
    if (g_dir[0] && g_dir_pid == getpid())
        rm_sysfs_tree(g_dir);
}

static void at_fork_prepare(void) { pthread_mutex_lock(&g_mu); }
static void at_fork_parent(void) { pthread_mutex_unlock(&g_mu); }

/* The child forgets the parent's objects: other threads are gone, their locks
 * may be held; sockets must not keep the parent's names and connections. */
static void at_fork_child(void)
{
    pthread_mutex_unlock(&g_mu);
    for (int fd = 0; fd < FV_FDS; fd++)
        if (atomic_load(&g_fdreg[fd])) {
            atomic_store(&g_fdreg[fd], 0);
            close(fd);
        }
    for (int i = 0; g_devs && i < g_ndev; i++)
        dev_init_runtime(&g_devs[i]);
    atomic_store(&g_live_qps, 0);
    atomic_store(&g_live_mrs, 0);
    atomic_store(&g_live_dmabuf_mrs, 0);
    atomic_store(&g_live_cqs, 0);
    atomic_store(&g_live_pds, 0);
    atomic_store(&g_live_ctx, 0);
    atomic_store(&g_overruns, 0);
    atomic_store(&g_corrupt, 0);
}

__attribute__((constructor)) static void fv_init(void)
{
    pthread_atfork(at_fork_prepare, at_fork_parent, at_fork_child);
}

/* ------------------------------------------------------------------------ */
/* MR tables (caller holds d->mr_rw)                                          */
/* ------------------------------------------------------------------------ */
static unsigned mr_hash(uint32_t key) { return (key * 2654435761u) >> 20 & (FV_MR_HASH - 1); }

static struct fmr *mr_by_lkey(struct fdev *d, uint32_t k)
{
    for (struct fmr *m = d->by_lkey[mr_hash(k)]; m; m = m->lnext)
        if (m->mr.lkey == k)
            return m;
    return NULL;
}

static struct fmr *mr_by_rkey(struct fdev *d, uint32_t k)
{
    for (struct fmr *m = d->by_rkey[mr_hash(k)]; m; m = m->rnext)
        if (m->mr.rkey == k)
            return m;
    return NULL;
}

/* host address of [addr, addr+len) (iova space) through MR m, or NULL */
static char *mr_host(struct fmr *m, uint64_t addr, uint64_t len)
{
    if (addr < m->iova || len > m->mr.length || addr - m->iova > m->mr.length - len)
        return NULL;
    return m->host + (addr - m->iova);
}

static char *local_host(struct fdev *d, struct fpd *pd, uint32_t lkey, uint64_t addr, uint64_t len, int need_write)
{
    struct fmr *m = mr_by_lkey(d, lkey);
    if (!m || m->pd != pd || (need_write && !(m->access & IBV_ACCESS_LOCAL_WRITE)))
        return NULL;
    return mr_host(m, addr, len);
}

static char *remote_host(struct fdev *d, struct fpd *pd, uint32_t rkey, uint64_t addr, uint64_t len, unsigned need)
{
    struct fmr *m = mr_by_rkey(d, rkey);
    if (!m || m->pd != pd || !(m->access & need))
        return NULL;
    return mr_host(m, addr, len);
}

static int check_sges(struct fdev *d, struct fpd *pd, const struct ibv_sge *g, int n, int need_write)
{
    int ok = 1;
    pthread_rwlock_rdlock(&d->mr_rw);
    for (int i = 0; i < n && ok; i++)
        if (g[i].length && !local_host(d, pd, g[i].lkey, g[i].addr, g[i].length, need_write))
            ok = 0;
    pthread_rwlock_unlock(&d->mr_rw);
    return ok ? 0 : -1;
}

static int remote_ok(struct fdev *d, struct fpd *pd, uint32_t rkey, uint64_t addr, uint64_t len, unsigned need)
{
    pthread_rwlock_rdlock(&d->mr_rw);
    int ok = remote_host(d, pd, rkey, addr, len, need) != NULL;
    pthread_rwlock_unlock(&d->mr_rw);
    return ok;
}

struct cursor {
    int i;
    uint64_t off;
};

/* Copies n bytes between buf and the SGE list at *cur (scatter: into the
 * SGEs), re-validating each lkey under the MR rwlock. -1: an MR vanished. */
static int sge_copy(struct fdev *d, struct fpd *pd, const struct ibv_sge *g, int ng, struct cursor *cur, char *buf,
                    size_t n, int scatter)
{
    int rc = 0;
    pthread_rwlock_rdlock(&d->mr_rw);
    while (n) {
        while (cur->i < ng && cur->off >= g[cur->i].length) {
            cur->i++;
            cur->off = 0;
        }
        if (cur->i >= ng) {
            rc = -1;
            break;
        }
        const struct ibv_sge *s = &g[cur->i];
        uint64_t take = s->length - cur->off;
        if (take > n)
            take = n;
        char *h = local_host(d, pd, s->lkey, s->addr + cur->off, take, scatter);
        if (!h) {
            rc = -1;
            break;
        }
        if (scatter)
            memcpy(h, buf, take);
        else
            memcpy(buf, h, take);
        buf += take;
        n -= take;
        cur->off += take;
    }
    pthread_rwlock_unlock(&d->mr_rw);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* CQs and channels                                                          */
/* ------------------------------------------------------------------------ */
static void ch_post(struct fch *ch, struct fcq *cq)
{
    struct evnode *e = malloc(sizeof *e);
    if (!e)
        return;
    e->next = NULL;
    e->cq = cq;
    pthread_mutex_lock(&ch->mu);
    if (ch->tail)
        ch->tail->next = e;
    else
        ch->head = e;
    ch->tail = e;
    char b = 1;
    if (send(ch->wfd, &b, 1, MSG_NOSIGNAL | MSG_DONTWAIT) != 1)
        fv_warn("completion channel full: an event is not signalled on its fd");
    pthread_mutex_unlock(&ch->mu);
}

static void mkwc(struct ibv_wc *wc, uint64_t wr_id, enum ibv_wc_status st, enum ibv_wc_opcode op, uint32_t byte_len,
                 uint32_t imm, unsigned flags, uint32_t qpn, uint32_t src_qp)
{
    memset(wc, 0, sizeof *wc);
    wc->wr_id = wr_id;
    wc->status = st;
    wc->opcode = op;
    wc->byte_len = byte_len;
    wc->imm_data = imm;
    wc->wc_flags = flags;
    wc->qp_num = qpn;
    wc->src_qp = src_qp;
}

static void cq_push(struct fcq *cq, struct fqp *qp, int is_send, uint64_t seq, const struct ibv_wc *wc)
{
    pthread_mutex_lock(&cq->mu);
    if (cq->count >= cq->cap) {
        atomic_fetch_add(&g_overruns, 1);
        if (!cq->overrun_said) {
            cq->overrun_said = 1;
            fv_warn("CQ overrun: CQ %p (%d entries) is full; completion of wr_id %llu on QP 0x%x lost", (void *)cq,
                  cq->cap, (unsigned long long)wc->wr_id, wc->qp_num);
        }
    } else {
        struct cqe_ent *e = &cq->ring[(cq->head + cq->count) % cq->cap];
        e->wc = *wc;
        e->qp = qp;
        e->seq = seq;
        e->is_send = is_send;
        cq->count++;
        if (cq->armed) {
            cq->armed = 0;
            if (cq->ch)
                ch_post(cq->ch, cq);
        }
    }
    pthread_mutex_unlock(&cq->mu);
}

/* removes the CQEs of qp (mlx5 does this on destroy and on RESET) */
static void cq_clean(struct fcq *cq, struct fqp *qp)
{
    pthread_mutex_lock(&cq->mu);
    int n = 0;
    for (int i = 0; i < cq->count; i++) {
        struct cqe_ent *e = &cq->ring[(cq->head + i) % cq->cap];
        if (e->qp == qp)
            continue;
        if (i != n)
            cq->ring[(cq->head + n) % cq->cap] = *e;
        n++;
    }
    cq->count = n;
    pthread_mutex_unlock(&cq->mu);
}

static int fv_poll_cq(struct ibv_cq *ibcq, int num, struct ibv_wc *wc)
{
    struct fcq *cq = (struct fcq *)ibcq;
    int k = 0;
    if (num <= 0)
        return 0;
    pthread_mutex_lock(&cq->mu);
    while (k < num && cq->count > 0) {
        struct cqe_ent *e = &cq->ring[cq->head];
        wc[k++] = e->wc;
        if (e->is_send)
            atomic_max(&e->qp->sq_freed, e->seq + 1);
        else
            atomic_max(&e->qp->rq_freed, e->seq + 1);
        cq->head = (cq->head + 1) % cq->cap;
        cq->count--;
    }
    pthread_mutex_unlock(&cq->mu);
    return k;
}

static int fv_req_notify_cq(struct ibv_cq *ibcq, int solicited_only)
{
    struct fcq *cq = (struct fcq *)ibcq;
    (void)solicited_only;
    pthread_mutex_lock(&cq->mu);
    cq->armed = 1;
    pthread_mutex_unlock(&cq->mu);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* QP internals (qp->mu held)                                                */
/* ------------------------------------------------------------------------ */
static enum ibv_wc_opcode wc_opcode(int wr_opcode)
{
    switch (wr_opcode) {
    case IBV_WR_RDMA_WRITE:
    case IBV_WR_RDMA_WRITE_WITH_IMM: return IBV_WC_RDMA_WRITE;
    case IBV_WR_RDMA_READ: return IBV_WC_RDMA_READ;
    default: return IBV_WC_SEND;
    }
}

static void qp_wake_locked(struct fqp *qp)
{
    uint64_t one = 1;
    pthread_cond_broadcast(&qp->cv);
    if (write(qp->wake_fd, &one, sizeof one) < 0) {
        /* the counter cannot overflow in practice; a pending wake suffices */
    }
}

static void flush_sq_locked(struct fqp *qp)
{
    struct ibv_wc wc;
    for (uint32_t i = 0; i < qp->sq_count; i++) {
        struct swr *w = &qp->sq[(qp->sq_head + i) % qp->cap_sw];
        mkwc(&wc, w->wr_id, IBV_WC_WR_FLUSH_ERR, wc_opcode(w->opcode), 0, 0, 0, qp->qp.qp_num, 0);
        cq_push(qp->scq, qp, 1, w->seq, &wc);
    }
    qp->sq_count = 0;
}

static void flush_rq_locked(struct fqp *qp)
{
    struct ibv_wc wc;
    for (uint32_t i = 0; i < qp->rq_count; i++) {
        struct rwr *r = &qp->rq[(qp->rq_head + i) % qp->cap_rw];
        mkwc(&wc, r->wr_id, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, 0, qp->qp.qp_num, 0);
        cq_push(qp->rcq, qp, 0, r->seq, &wc);
    }
    qp->rq_count = 0;
}

static void qp_to_err_locked(struct fqp *qp)
{
    if (qp->st == IBV_QPS_ERR)
        return;
    qp->st = IBV_QPS_ERR;
    atomic_fetch_add(&qp->gen, 1);
    flush_sq_locked(qp);
    flush_rq_locked(qp);
    qp_wake_locked(qp);
}

static void qp_reset_locked(struct fqp *qp)
{
    qp->st = IBV_QPS_RESET;
    atomic_fetch_add(&qp->gen, 1);
    qp->sq_count = 0;
    qp->rq_count = 0;
    atomic_store(&qp->sq_freed, qp->sq_posted);
    atomic_store(&qp->rq_freed, qp->rq_posted);
    cq_clean(qp->scq, qp);
    if (qp->rcq != qp->scq)
        cq_clean(qp->rcq, qp);
    memset(&qp->a, 0, sizeof qp->a);
    qp->dest_key = 0;
    qp->dest_slot = 0;
    qp->next_psn = qp->exp_psn = 0;
    qp_wake_locked(qp);
}

/* head receive reserved for an incoming message; returns its SGEs */
static int rq_reserve_locked(struct fqp *qp, struct ibv_sge *sges, int *nsge)
{
    if (qp->rq_count == 0)
        return 0;
    struct rwr *r = &qp->rq[qp->rq_head];
    if (r->reserved)
        return 0;
    r->reserved = 1;
    if (sges) {
        *nsge = r->num_sge;
        memcpy(sges, &qp->rq_sge[(size_t)qp->rq_head * qp->cap_rs], sizeof(struct ibv_sge) * (size_t)r->num_sge);
    }
    return 1;
}

static void rq_unreserve_locked(struct fqp *qp)
{
    if (qp->rq_count)
        qp->rq[qp->rq_head].reserved = 0;
}

/* completes the reserved head receive */
static void rq_complete_locked(struct fqp *qp, enum ibv_wc_status st, enum ibv_wc_opcode op, uint32_t len,
                               uint32_t imm, unsigned flags, uint32_t src_qp)
{
    struct ibv_wc wc;
    if (!qp->rq_count)
        return;
    struct rwr *r = &qp->rq[qp->rq_head];
    mkwc(&wc, r->wr_id, st, op, st == IBV_WC_SUCCESS ? len : 0, st == IBV_WC_SUCCESS ? imm : 0,
         st == IBV_WC_SUCCESS ? flags : 0, qp->qp.qp_num, src_qp);
    uint64_t seq = r->seq;
    qp->rq_head = (qp->rq_head + 1) % qp->cap_rw;
    qp->rq_count--;
    cq_push(qp->rcq, qp, 0, seq, &wc);
}

static struct fqp *qp_get(struct fdev *d, uint32_t qpn)
{
    struct fqp *qp = NULL;
    pthread_mutex_lock(&d->mu);
    if (d->started && (int)(qpn >> 12) == d->slot) {
        qp = d->qps[qpn & 0xfff];
        if (qp)
            qp->refs++;
    }
    pthread_mutex_unlock(&d->mu);
    return qp;
}

static void qp_put(struct fqp *qp)
{
    struct fdev *d = qp->d;
    pthread_mutex_lock(&d->mu);
    if (--qp->refs == 0)
        pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

/* ------------------------------------------------------------------------ */
/* Responder: one thread per incoming connection                             */
/* ------------------------------------------------------------------------ */
struct sconn {
    int fd;
    struct fdev *d;
    char *buf;
};

static int drain(struct sconn *c, uint64_t n)
{
    while (n) {
        size_t k = n > FV_CHUNK ? FV_CHUNK : (size_t)n;
        if (read_full(c->fd, c->buf, k))
            return -1;
        n -= k;
    }
    return 0;
}

static int answer(struct sconn *c, const struct wreq *q, int status, int rnr, int has_data, uint64_t len)
{
    struct wans a;
    memset(&a, 0, sizeof a);
    a.magic = ANS_MAGIC;
    a.status = (uint8_t)status;
    a.rnr_timer = (uint8_t)rnr;
    a.has_data = (uint8_t)has_data;
    a.seq = q->seq;
    a.len = len;
    return write_full(c->fd, &a, sizeof a);
}

/* a remote error: the responder QP goes to ERR too, then the NAK */
static int fail_answer(struct sconn *c, struct fqp *qp, const struct wreq *q, uint64_t gen, int status)
{
    pthread_mutex_lock(&qp->mu);
    if (atomic_load(&qp->gen) != gen) {
        pthread_mutex_unlock(&qp->mu);
        return 0;
    }
    qp_to_err_locked(qp);
    pthread_mutex_unlock(&qp->mu);
    return answer(c, q, status, 0, 0, 0);
}

static int serve_write(struct sconn *c, struct fqp *qp, const struct wreq *q, uint64_t gen, unsigned qacc, int rnr_t)
{
    struct fdev *d = c->d;
    int status = A_OK, reserved = 0, bad = 0;
    if (!(qacc & IBV_ACCESS_REMOTE_WRITE))
        status = A_INV_REQ;
    else if (q->len && !remote_ok(d, qp->pd, q->rkey, q->raddr, q->len, IBV_ACCESS_REMOTE_WRITE))
        status = A_ACCESS;
    if (status != A_OK) {
        if (drain(c, q->len))
            return -1;
        return fail_answer(c, qp, q, gen, status);
    }
    if (q->op == OP_WRITE_IMM) {
        pthread_mutex_lock(&qp->mu);
        int same = atomic_load(&qp->gen) == gen;
        reserved = same && rq_reserve_locked(qp, NULL, NULL);
        pthread_mutex_unlock(&qp->mu);
        if (!reserved) {
            if (drain(c, q->len))
                return -1;
            return same ? answer(c, q, A_RNR, rnr_t, 0, 0) : 0;
        }
    }
    for (uint64_t off = 0; off < q->len;) {
        size_t n = q->len - off > FV_CHUNK ? FV_CHUNK : (size_t)(q->len - off);
        if (read_full(c->fd, c->buf, n)) {
            pthread_mutex_lock(&qp->mu);
            if (reserved && atomic_load(&qp->gen) == gen)
                rq_unreserve_locked(qp);
            pthread_mutex_unlock(&qp->mu);
            return -1;
        }
        if (!bad) {
            pthread_rwlock_rdlock(&d->mr_rw);
            char *h = remote_host(d, qp->pd, q->rkey, q->raddr + off, n, IBV_ACCESS_REMOTE_WRITE);
            if (h)
                memcpy(h, c->buf, n);
            else
                bad = 1;
            pthread_rwlock_unlock(&d->mr_rw);
        }
        off += n;
    }
    pthread_mutex_lock(&qp->mu);
    if (atomic_load(&qp->gen) != gen) {
        pthread_mutex_unlock(&qp->mu);
        return 0;
    }
    if (bad) {
        if (reserved)
            rq_unreserve_locked(qp);
        qp_to_err_locked(qp);
        pthread_mutex_unlock(&qp->mu);
        return answer(c, q, A_ACCESS, 0, 0, 0);
    }
    if (reserved)
        rq_complete_locked(qp, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, (uint32_t)q->len, q->imm, IBV_WC_WITH_IMM,
                           q->src_qpn);
    qp->exp_psn = (qp->exp_psn + 1) & 0xffffff;
    pthread_mutex_unlock(&qp->mu);
    atomic_fetch_add(&d->bytes_in, q->len);
    return answer(c, q, A_OK, 0, 0, 0);
}

static int serve_send(struct sconn *c, struct fqp *qp, const struct wreq *q, uint64_t gen, int rnr_t)
{
    struct fdev *d = c->d;
    struct ibv_sge sg[FV_MAX_SGE];
    int ns = 0, bad = 0;
    pthread_mutex_lock(&qp->mu);
    int same = atomic_load(&qp->gen) == gen;
    int reserved = same && rq_reserve_locked(qp, sg, &ns);
    pthread_mutex_unlock(&qp->mu);
    if (!reserved) {
        if (drain(c, q->len))
            return -1;
        return same ? answer(c, q, A_RNR, rnr_t, 0, 0) : 0;
    }
    uint64_t room = 0;
    for (int i = 0; i < ns; i++)
        room += sg[i].length;
    enum ibv_wc_status rst = IBV_WC_SUCCESS;
    int ast = A_OK;
    if (q->len > room) {
        rst = IBV_WC_LOC_LEN_ERR;
        ast = A_INV_REQ;
    } else if (check_sges(d, qp->pd, sg, ns, 1)) {
        rst = IBV_WC_LOC_PROT_ERR;
        ast = A_OP_ERR;
    }
    if (ast == A_OK) {
        struct cursor cur = {0, 0};
        for (uint64_t off = 0; off < q->len;) {
            size_t n = q->len - off > FV_CHUNK ? FV_CHUNK : (size_t)(q->len - off);
            if (read_full(c->fd, c->buf, n)) {
                pthread_mutex_lock(&qp->mu);
                if (atomic_load(&qp->gen) == gen)
                    rq_unreserve_locked(qp);
                pthread_mutex_unlock(&qp->mu);
                return -1;
            }
            if (!bad && sge_copy(d, qp->pd, sg, ns, &cur, c->buf, n, 1))
                bad = 1;
            off += n;
        }
        if (bad) {
            rst = IBV_WC_LOC_PROT_ERR;
            ast = A_OP_ERR;
        }
    } else if (drain(c, q->len)) {
        pthread_mutex_lock(&qp->mu);
        if (atomic_load(&qp->gen) == gen)
            rq_unreserve_locked(qp);
        pthread_mutex_unlock(&qp->mu);
        return -1;
    }
    pthread_mutex_lock(&qp->mu);
    if (atomic_load(&qp->gen) != gen) {
        pthread_mutex_unlock(&qp->mu);
        return 0;
    }
    int imm = q->op == OP_SEND_IMM;
    rq_complete_locked(qp, rst, IBV_WC_RECV, (uint32_t)q->len, imm ? q->imm : 0, imm ? IBV_WC_WITH_IMM : 0,
                       q->src_qpn);
    if (ast != A_OK) {
        qp_to_err_locked(qp);
        pthread_mutex_unlock(&qp->mu);
        return answer(c, q, ast, 0, 0, 0);
    }
    qp->exp_psn = (qp->exp_psn + 1) & 0xffffff;
    pthread_mutex_unlock(&qp->mu);
    atomic_fetch_add(&d->bytes_in, q->len);
    return answer(c, q, A_OK, 0, 0, 0);
}

static int serve_read(struct sconn *c, struct fqp *qp, const struct wreq *q, uint64_t gen, unsigned qacc, int rd_ok,
                      int dup)
{
    struct fdev *d = c->d;
    int status = A_OK, bad = 0;
    if (!(qacc & IBV_ACCESS_REMOTE_READ) || !rd_ok)
        status = A_INV_REQ;
    else if (q->len && !remote_ok(d, qp->pd, q->rkey, q->raddr, q->len, IBV_ACCESS_REMOTE_READ))
        status = A_ACCESS;
    if (status != A_OK)
        return fail_answer(c, qp, q, gen, status);
    pthread_mutex_lock(&qp->mu);
    if (atomic_load(&qp->gen) != gen) {
        pthread_mutex_unlock(&qp->mu);
        return 0;
    }
    if (!dup)
        qp->exp_psn = (qp->exp_psn + 1) & 0xffffff;
    pthread_mutex_unlock(&qp->mu);
    if (answer(c, q, A_OK, 0, 1, q->len))
        return -1;
    for (uint64_t off = 0; off < q->len;) {
        size_t n = q->len - off > FV_CHUNK ? FV_CHUNK : (size_t)(q->len - off);
        pthread_rwlock_rdlock(&d->mr_rw);
        char *h = remote_host(d, qp->pd, q->rkey, q->raddr + off, n, IBV_ACCESS_REMOTE_READ);
        if (h)
            memcpy(c->buf, h, n);
        pthread_rwlock_unlock(&d->mr_rw);
        if (!h) {
            bad = 1;
            break;
        }
        struct wframe f = {(uint32_t)n, 0};
        if (write_full(c->fd, &f, sizeof f) || write_full(c->fd, c->buf, n))
            return -1;
        off += n;
    }
    struct wframe end = {0, bad ? A_ACCESS : A_OK};
    if (bad) {
        pthread_mutex_lock(&qp->mu);
        if (atomic_load(&qp->gen) == gen)
            qp_to_err_locked(qp);
        pthread_mutex_unlock(&qp->mu);
    } else {
        atomic_fetch_add(&d->bytes_in, q->len);
    }
    return write_full(c->fd, &end, sizeof end);
}

/* returns nonzero to drop the connection */
static int serve_one(struct sconn *c, const struct wreq *q)
{
    struct fdev *d = c->d;
    uint64_t plen = q->op == OP_READ ? 0 : q->len;
    if (dev_down(d))
        return drain(c, plen);
    struct fqp *qp = qp_get(d, q->dst_qpn);
    if (!qp)
        return drain(c, plen);
    pthread_mutex_lock(&qp->resp_mu);
    pthread_mutex_lock(&qp->mu);
    int ok = !atomic_load(&qp->stop) && (qp->st == IBV_QPS_RTR || qp->st == IBV_QPS_RTS) &&
             qp->a.dest_qp_num == q->src_qpn && qp->dest_key == q->src_key;
    /* the PSN must be the expected one; the one before is a duplicate (a
     * retransmission whose answer was lost): re-answered, not re-executed,
     * except READs, which are executed again. Anything else is dropped. */
    int dup = ok && q->psn != qp->exp_psn;
    if (dup && q->psn != ((qp->exp_psn - 1) & 0xffffff))
        ok = 0;
    uint64_t gen = atomic_load(&qp->gen);
    unsigned qacc = qp->a.qp_access_flags;
    int rd_ok = qp->a.max_dest_rd_atomic > 0;
    int rnr_t = qp->a.min_rnr_timer;
    int stopping = atomic_load(&qp->stop);
    if (ok)
        qp->serving_fd = c->fd;
    pthread_mutex_unlock(&qp->mu);
    if (!ok) {
        /* release the QP before draining: a stalled peer must not delay
         * ibv_destroy_qp; a QP being destroyed drops the connection */
        pthread_mutex_unlock(&qp->resp_mu);
        qp_put(qp);
        return stopping ? -1 : drain(c, plen);
    }
    int rc;
    {
        if (dup && q->op != OP_READ) {
            rc = drain(c, plen);
            if (!rc)
                rc = answer(c, q, A_OK, 0, 0, 0);
        } else {
            switch (q->op) {
            case OP_WRITE:
            case OP_WRITE_IMM: rc = serve_write(c, qp, q, gen, qacc, rnr_t); break;
            case OP_SEND:
            case OP_SEND_IMM: rc = serve_send(c, qp, q, gen, rnr_t); break;
            default: rc = serve_read(c, qp, q, gen, qacc, rd_ok, dup); break;
            }
        }
        pthread_mutex_lock(&qp->mu);
        qp->serving_fd = -1;
        pthread_mutex_unlock(&qp->mu);
    }
    pthread_mutex_unlock(&qp->resp_mu);
    qp_put(qp);
    return rc;
}

static void *serve_main(void *arg)
{
    struct sconn *c = arg;
    c->buf = malloc(FV_CHUNK);
    while (c->buf) {
        struct wreq q;
        if (read_full(c->fd, &q, sizeof q))
            break;
        if (q.magic != REQ_MAGIC || q.op < OP_WRITE || q.op > OP_READ || q.len > FV_MAX_MSG)
            break; /* malformed: drop the connection */
        if (serve_one(c, &q))
            break;
    }
    fd_close(c->fd);
    free(c->buf);
    free(c);
    return NULL;
}

static void *listen_main(void *arg)
{
    struct fdev *d = arg;
    int lfd = d->lfd;
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS) {
                usleep(10000);
                continue;
            }
            return NULL; /* socket closed (fork child) */
        }
        fd_reg(fd);
        struct sconn *c = calloc(1, sizeof *c);
        if (!c) {
            fd_close(fd);
            continue;
        }
        c->fd = fd;
        c->d = d;
        if (spawn(NULL, serve_main, c, 1)) {
            fd_close(fd);
            free(c);
        }
    }
}

/* binds the device's listener (first open in this process); d->mu held */
static int dev_start_locked(struct fdev *d)
{
    if (d->started)
        return 0;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    fd_reg(fd);
    int first = (int)(getpid() % FV_SLOTS) + 1, slot = 0;
    for (int i = 0; i < FV_SLOTS; i++) {
        int s = (first - 1 + i) % FV_SLOTS + 1;
        struct sockaddr_un a;
        socklen_t len;
        route_addr(&a, &len, d->key, s);
        if (bind(fd, (struct sockaddr *)&a, len) == 0) {
            slot = s;
            break;
        }
        if (errno != EADDRINUSE) {
            int e = errno;
            fd_close(fd);
            errno = e;
            return -1;
        }
    }
    if (!slot || listen(fd, 256)) {
        fd_close(fd);
        errno = EADDRINUSE;
        return -1;
    }
    d->lfd = fd;
    d->slot = slot;
    if (spawn(NULL, listen_main, d, 1)) {
        fd_close(fd);
        d->lfd = -1;
        d->slot = 0;
        errno = EAGAIN;
        return -1;
    }
    d->started = 1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Requester: one thread per QP, executes the send queue in order            */
/* ------------------------------------------------------------------------ */
struct rconn {
    int fd;
    uint64_t key;
    int slot;
    uint64_t seq;
    char *buf;
};

struct snap {
    struct swr w;
    struct ibv_sge sge[FV_MAX_SGE];
    uint8_t inl[FV_MAX_INLINE];
    uint64_t gen, dest_key;
    int dest_slot;
    uint32_t dest_qpn, my_qpn, psn;
    int64_t per_try;
    int retry_cnt, rnr_retry;
};

enum { IO_OK = 0, IO_ERR = -1, IO_TIMEOUT = -2, IO_ABORT = -3, IO_LOCAL = -4 };
#define R_ABORT (-1)

static const uint32_t rnr_us[32] = {655360, 10,    20,    30,    40,    60,     80,     120,
                                    160,    240,   320,   480,   640,   960,    1280,   1920,
                                    2560,   3840,  5120,  7680,  10240, 15360,  20480,  30720,
                                    40960,  61440, 81920, 122880, 163840, 245760, 327680, 491520};

static void rconn_close(struct rconn *r)
{
    fd_close(r->fd);
    r->fd = -1;
}

static int rconn_ensure(struct rconn *r, uint64_t key, int slot)
{
    if (r->fd >= 0 && r->key == key && r->slot == slot)
        return 0;
    rconn_close(r);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    fd_reg(fd);
    int sz = 1 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    struct sockaddr_un a;
    socklen_t len;
    route_addr(&a, &len, key, slot);
    if (connect(fd, (struct sockaddr *)&a, len) != 0) {
        fd_close(fd);
        return -1;
    }
    r->fd = fd;
    r->key = key;
    r->slot = slot;
    return 0;
}

static int rq_aborted(struct fqp *qp, uint64_t gen)
{
    return atomic_load(&qp->stop) || atomic_load(&qp->gen) != gen;
}

static void drain_wake(struct fqp *qp)
{
    uint64_t v;
    if (read(qp->wake_fd, &v, sizeof v) < 0) {
        /* EAGAIN: nothing pending */
    }
}

static struct timespec ts_of(int64_t ns)
{
    struct timespec t;
    if (ns < 0)
        ns = 0;
    t.tv_sec = ns / 1000000000LL;
    t.tv_nsec = ns % 1000000000LL;
    return t;
}

/* sleeps until deadline; IO_ABORT when the WR went stale */
static int rq_sleep(struct fqp *qp, uint64_t gen, int64_t deadline)
{
    for (;;) {
        if (rq_aborted(qp, gen))
            return IO_ABORT;
        int64_t left = deadline - now_ns();
        if (left <= 0)
            return IO_OK;
        struct pollfd p = {qp->wake_fd, POLLIN, 0};
        struct timespec t = ts_of(left);
        if (ppoll(&p, 1, &t, NULL) > 0)
            drain_wake(qp);
    }
}

/* non-blocking transfer with a no-progress timeout */
static int rq_io(struct fqp *qp, uint64_t gen, int fd, void *buf, size_t n, int writing, int64_t per_try)
{
    char *p = buf;
    int64_t deadline = now_ns() + per_try;
    while (n) {
        ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT) : recv(fd, p, n, MSG_DONTWAIT);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            deadline = now_ns() + per_try;
            continue;
        }
        if (k == 0 && !writing)
            return IO_ERR;
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return IO_ERR;
        for (;;) {
            if (rq_aborted(qp, gen))
                return IO_ABORT;
            int64_t left = deadline - now_ns();
            if (left <= 0)
                return p == (char *)buf ? IO_TIMEOUT : IO_ERR; /* a partial message desyncs the stream */
            struct pollfd pf[2] = {{fd, (short)(writing ? POLLOUT : POLLIN), 0}, {qp->wake_fd, POLLIN, 0}};
            struct timespec t = ts_of(left);
            int r = ppoll(pf, 2, &t, NULL);
            if (r > 0 && (pf[1].revents & POLLIN))
                drain_wake(qp);
            if (r > 0 && pf[0].revents)
                break;
        }
    }
    return IO_OK;
}

static int send_payload(struct fqp *qp, struct rconn *r, struct snap *s, uint64_t total)
{
    if (s->w.flags & IBV_SEND_INLINE)
        return rq_io(qp, s->gen, r->fd, s->inl, (size_t)total, 1, s->per_try);
    struct cursor cur = {0, 0};
    for (uint64_t left = total; left;) {
        size_t n = left > FV_CHUNK ? FV_CHUNK : (size_t)left;
        if (sge_copy(qp->d, qp->pd, s->sge, s->w.num_sge, &cur, r->buf, n, 0))
            return IO_LOCAL;
        int k = rq_io(qp, s->gen, r->fd, r->buf, n, 1, s->per_try);
        if (k)
            return k;
        left -= n;
    }
    return IO_OK;
}

/* Reads the frames of a READ answer (scattering if scatter != 0). Returns an
 * IO_ code; *status gets the final frame status, *local_bad a local error. */
static int recv_frames(struct fqp *qp, struct rconn *r, struct snap *s, uint64_t total, int scatter, int *status,
                       int *local_bad)
{
    struct cursor cur = {0, 0};
    uint64_t got = 0;
    for (;;) {
        struct wframe f;
        int k = rq_io(qp, s->gen, r->fd, &f, sizeof f, 0, s->per_try);
        if (k)
            return k;
        if (f.len == 0) {
            *status = (int)f.status;
            if (scatter && f.status == A_OK && got != total)
                return IO_ERR;
            return IO_OK;
        }
        if (f.len > FV_CHUNK || (scatter && got + f.len > total))
            return IO_ERR;
        k = rq_io(qp, s->gen, r->fd, r->buf, f.len, 0, s->per_try);
        if (k)
            return k;
        if (scatter && !*local_bad && sge_copy(qp->d, qp->pd, s->sge, s->w.num_sge, &cur, r->buf, f.len, 1))
            *local_bad = 1;
        got += f.len;
    }
}

static int take_corrupt(void)
{
    unsigned v = atomic_load(&g_corrupt);
    while (v > 0)
        if (atomic_compare_exchange_weak(&g_corrupt, &v, v - 1))
            return 1;
    return 0;
}

/* Executes one send WR; returns an ibv_wc_status or R_ABORT. */
static int run_wr(struct fqp *qp, struct rconn *r, struct snap *s, uint32_t *byte_len, uint64_t *moved)
{
    struct fdev *d = qp->d;
    struct swr *w = &s->w;
    int is_read = w->opcode == IBV_WR_RDMA_READ;
    uint64_t total = 0;
    *byte_len = 0;
    *moved = 0;
    if (w->flags & IBV_SEND_INLINE)
        total = w->inl_len;
    else
        for (int i = 0; i < w->num_sge; i++)
            total += s->sge[i].length;
    if (total > FV_MAX_MSG)
        return IBV_WC_LOC_LEN_ERR;
    if (!(w->flags & IBV_SEND_INLINE) && check_sges(d, qp->pd, s->sge, w->num_sge, is_read))
        return IBV_WC_LOC_PROT_ERR;
    unsigned delay = atomic_load(&g_delay_us);
    if (delay && rq_sleep(qp, s->gen, now_ns() + (int64_t)delay * 1000) == IO_ABORT)
        return R_ABORT;
    uint8_t op;
    switch (w->opcode) {
    case IBV_WR_RDMA_WRITE: op = OP_WRITE; break;
    case IBV_WR_RDMA_WRITE_WITH_IMM: op = OP_WRITE_IMM; break;
    case IBV_WR_SEND: op = OP_SEND; break;
    case IBV_WR_SEND_WITH_IMM: op = OP_SEND_IMM; break;
    default: op = OP_READ; break;
    }
    uint32_t rkey = w->rkey;
    if ((op == OP_WRITE || op == OP_WRITE_IMM || op == OP_READ) && total > 0 && take_corrupt())
        rkey ^= 1u; /* an lkey pattern: never a valid rkey anywhere */
    int tries = 0, rnr = 0;
    uint64_t first_seq = r->seq + 1;
    for (;;) {
        if (tries > s->retry_cnt) {
            rconn_close(r);
            return IBV_WC_RETRY_EXC_ERR;
        }
        int64_t try_end = now_ns() + s->per_try;
        int k;
        if (dev_down(d) || rconn_ensure(r, s->dest_key, s->dest_slot)) {
            rconn_close(r);
            if (rq_sleep(qp, s->gen, try_end) == IO_ABORT)
                return R_ABORT;
            tries++;
            continue;
        }
        struct wreq q;
        memset(&q, 0, sizeof q);
        q.magic = REQ_MAGIC;
        q.op = op;
        q.src_qpn = s->my_qpn;
        q.dst_qpn = s->dest_qpn;
        q.psn = s->psn;
        q.rkey = rkey;
        q.imm = w->imm;
        q.src_key = d->key;
        q.seq = ++r->seq;
        q.raddr = w->raddr;
        q.len = total;
        k = rq_io(qp, s->gen, r->fd, &q, sizeof q, 1, s->per_try);
        if (k == IO_OK && !is_read && total)
            k = send_payload(qp, r, s, total);
        if (k == IO_ABORT)
            return R_ABORT;
        if (k == IO_LOCAL) {
            rconn_close(r);
            return IBV_WC_LOC_PROT_ERR;
        }
        if (k != IO_OK) {
            rconn_close(r);
            if (rq_sleep(qp, s->gen, try_end) == IO_ABORT)
                return R_ABORT;
            tries++;
            continue;
        }
        /* wait for the answer */
        int retransmit = 0;
        while (!retransmit) {
            struct wans a;
            k = rq_io(qp, s->gen, r->fd, &a, sizeof a, 0, s->per_try);
            if (k == IO_ABORT)
                return R_ABORT;
            if (k == IO_TIMEOUT) {
                tries++;
                retransmit = 1;
                break;
            }
            if (k != IO_OK || a.magic != ANS_MAGIC) {
                rconn_close(r);
                if (rq_sleep(qp, s->gen, try_end) == IO_ABORT)
                    return R_ABORT;
                tries++;
                retransmit = 1;
                break;
            }
            if (a.seq < first_seq || a.seq > r->seq || dev_down(d)) {
                /* an answer to an older request, or lost on a dropped link */
                if (a.has_data) {
                    int st = 0, lb = 0;
                    k = recv_frames(qp, r, s, 0, 0, &st, &lb);
                    if (k == IO_ABORT)
                        return R_ABORT;
                    if (k) {
                        rconn_close(r);
                        retransmit = 1;
                        tries++;
                    }
                }
                continue;
            }
            switch (a.status) {
            case A_OK:
                if (is_read) {
                    int st = A_OK, lb = 0;
                    if (a.len != total) {
                        rconn_close(r);
                        retransmit = 1;
                        tries++;
                        break;
                    }
                    k = recv_frames(qp, r, s, total, 1, &st, &lb);
                    if (k == IO_ABORT)
                        return R_ABORT;
                    if (k) {
                        rconn_close(r);
                        if (rq_sleep(qp, s->gen, try_end) == IO_ABORT)
                            return R_ABORT;
                        retransmit = 1;
                        tries++;
                        break;
                    }
                    if (st != A_OK)
                        return IBV_WC_REM_ACCESS_ERR;
                    if (lb)
                        return IBV_WC_LOC_PROT_ERR;
                    *byte_len = (uint32_t)total;
                }
                *moved = total;
                return IBV_WC_SUCCESS;
            case A_RNR:
                rnr++;
                tries = 0;
                if (s->rnr_retry != 7 && rnr > s->rnr_retry)
                    return IBV_WC_RNR_RETRY_EXC_ERR;
                {
                    int64_t us = rnr_us[a.rnr_timer & 31];
                    if (us < 1000)
                        us = 1000;
                    if (rq_sleep(qp, s->gen, now_ns() + us * 1000) == IO_ABORT)
                        return R_ABORT;
                }
                retransmit = 1;
                break;
            case A_ACCESS: return IBV_WC_REM_ACCESS_ERR;
            case A_INV_REQ: return IBV_WC_REM_INV_REQ_ERR;
            case A_OP_ERR: return IBV_WC_REM_OP_ERR;
            default:
                rconn_close(r);
                retransmit = 1;
                tries++;
                break;
            }
        }
    }
}

static void transport_timer(int timeout, int retry_cnt, int64_t *per_try)
{
    const int64_t cap = 1000000000LL;
    int64_t tries = retry_cnt + 1, total;
    if (timeout == 0 || timeout >= 28)
        total = cap;
    else {
        double t = 4096.0 * (double)(1ull << timeout) * (double)tries;
        total = t > (double)cap ? cap : (int64_t)t;
    }
    int64_t pt = total / tries;
    if (pt < 2000000)
        pt = 2000000;
    *per_try = pt;
}

static void *requester_main(void *arg)
{
    struct fqp *qp = arg;
    struct rconn r = {-1, 0, 0, 0, malloc(FV_CHUNK)};
    struct snap s;
    pthread_mutex_lock(&qp->mu);
    while (r.buf) {
        while (!atomic_load(&qp->stop) && !(qp->st == IBV_QPS_RTS && qp->sq_count > 0))
            pthread_cond_wait(&qp->cv, &qp->mu);
        if (atomic_load(&qp->stop))
            break;
        uint32_t slot = qp->sq_head;
        s.w = qp->sq[slot];
        memcpy(s.sge, &qp->sq_sge[(size_t)slot * qp->cap_ss], sizeof(struct ibv_sge) * (size_t)s.w.num_sge);
        if (s.w.flags & IBV_SEND_INLINE)
            memcpy(s.inl, &qp->sq_inl[(size_t)slot * qp->cap_inl], s.w.inl_len);
        s.gen = atomic_load(&qp->gen);
        s.dest_key = qp->dest_key;
        s.dest_slot = qp->dest_slot;
        s.dest_qpn = qp->a.dest_qp_num;
        s.my_qpn = qp->qp.qp_num;
        s.psn = qp->next_psn;
        s.retry_cnt = qp->a.retry_cnt;
        s.rnr_retry = qp->a.rnr_retry;
        transport_timer(qp->a.timeout, qp->a.retry_cnt, &s.per_try);
        pthread_mutex_unlock(&qp->mu);

        uint32_t byte_len;
        uint64_t moved;
        int st = run_wr(qp, &r, &s, &byte_len, &moved);

        pthread_mutex_lock(&qp->mu);
        if (st == R_ABORT || atomic_load(&qp->gen) != s.gen) {
            rconn_close(&r); /* an answer may still be on its way */
            continue;
        }
        qp->sq_head = (qp->sq_head + 1) % qp->cap_sw;
        qp->sq_count--;
        struct ibv_wc wc;
        if (st == IBV_WC_SUCCESS) {
            qp->next_psn = (qp->next_psn + 1) & 0xffffff;
            atomic_fetch_add(&qp->d->bytes_out, moved);
            if (s.w.signaled) {
                mkwc(&wc, s.w.wr_id, IBV_WC_SUCCESS, wc_opcode(s.w.opcode), byte_len, 0, 0, qp->qp.qp_num, 0);
                cq_push(qp->scq, qp, 1, s.w.seq, &wc);
            }
        } else {
            rconn_close(&r);
            mkwc(&wc, s.w.wr_id, (enum ibv_wc_status)st, wc_opcode(s.w.opcode), 0, 0, 0, qp->qp.qp_num, 0);
            cq_push(qp->scq, qp, 1, s.w.seq, &wc);
            qp_to_err_locked(qp);
        }
    }
    pthread_mutex_unlock(&qp->mu);
    rconn_close(&r);
    free(r.buf);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Data path entry points (context->ops)                                     */
/* ------------------------------------------------------------------------ */
static int fv_post_send(struct ibv_qp *ibqp, struct ibv_send_wr *wr, struct ibv_send_wr **bad)
{
    struct fqp *qp = (struct fqp *)ibqp;
    int err = 0, queued = 0;
    pthread_mutex_lock(&qp->mu);
    for (; wr; wr = wr->next) {
        int inl = (wr->send_flags & IBV_SEND_INLINE) != 0;
        uint64_t total = 0;
        if (qp->st != IBV_QPS_RTS && qp->st != IBV_QPS_ERR)
            err = EINVAL;
        else if (wr->opcode != IBV_WR_RDMA_WRITE && wr->opcode != IBV_WR_RDMA_WRITE_WITH_IMM &&
                 wr->opcode != IBV_WR_SEND && wr->opcode != IBV_WR_SEND_WITH_IMM && wr->opcode != IBV_WR_RDMA_READ)
            err = EINVAL;
        else if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap_ss || (wr->num_sge && !wr->sg_list))
            err = EINVAL;
        if (!err && inl) {
            for (int i = 0; i < wr->num_sge; i++)
                total += wr->sg_list[i].length;
            if (wr->opcode == IBV_WR_RDMA_READ || total > qp->cap_inl)
                err = EINVAL;
        }
        if (!err && qp->sq_posted - atomic_load(&qp->sq_freed) + 1 > qp->cap_sw)
            err = ENOMEM;
        if (err)
            break;
        uint64_t seq = qp->sq_posted++;
        if (qp->st == IBV_QPS_ERR) {
            struct ibv_wc wc;
            mkwc(&wc, wr->wr_id, IBV_WC_WR_FLUSH_ERR, wc_opcode(wr->opcode), 0, 0, 0, qp->qp.qp_num, 0);
            cq_push(qp->scq, qp, 1, seq, &wc);
            continue;
        }
        uint32_t slot = (qp->sq_head + qp->sq_count) % qp->cap_sw;
        struct swr *w = &qp->sq[slot];
        w->wr_id = wr->wr_id;
        w->seq = seq;
        w->raddr = wr->wr.rdma.remote_addr;
        w->rkey = wr->wr.rdma.rkey;
        w->imm = wr->imm_data;
        w->opcode = wr->opcode;
        w->flags = wr->send_flags;
        w->signaled = qp->sig_all || (wr->send_flags & IBV_SEND_SIGNALED);
        w->num_sge = wr->num_sge;
        w->inl_len = 0;
        if (inl) {
            uint8_t *dst = &qp->sq_inl[(size_t)slot * qp->cap_inl];
            for (int i = 0; i < wr->num_sge; i++) {
                if (wr->sg_list[i].length)
                    memcpy(dst + w->inl_len, (const void *)(uintptr_t)wr->sg_list[i].addr, wr->sg_list[i].length);
                w->inl_len += wr->sg_list[i].length;
            }
            w->num_sge = 0;
        } else if (wr->num_sge) {
            memcpy(&qp->sq_sge[(size_t)slot * qp->cap_ss], wr->sg_list, sizeof(struct ibv_sge) * (size_t)wr->num_sge);
        }
        qp->sq_count++;
        queued = 1;
    }
    if (queued)
        pthread_cond_broadcast(&qp->cv);
    pthread_mutex_unlock(&qp->mu);
    if (err && bad)
        *bad = wr;
    return err;
}

static int fv_post_recv(struct ibv_qp *ibqp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad)
{
    struct fqp *qp = (struct fqp *)ibqp;
    int err = 0;
    pthread_mutex_lock(&qp->mu);
    for (; wr; wr = wr->next) {
        if (qp->st == IBV_QPS_RESET)
            err = EINVAL;
        else if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap_rs || (wr->num_sge && !wr->sg_list))
            err = EINVAL;
        else if (qp->rq_posted - atomic_load(&qp->rq_freed) + 1 > qp->cap_rw)
            err = ENOMEM;
        if (err)
            break;
        uint64_t seq = qp->rq_posted++;
        if (qp->st == IBV_QPS_ERR) {
            struct ibv_wc wc;
            mkwc(&wc, wr->wr_id, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, 0, qp->qp.qp_num, 0);
            cq_push(qp->rcq, qp, 0, seq, &wc);
            continue;
        }
        uint32_t slot = (qp->rq_head + qp->rq_count) % qp->cap_rw;
        struct rwr *r = &qp->rq[slot];
        r->wr_id = wr->wr_id;
        r->seq = seq;
        r->num_sge = wr->num_sge;
        r->reserved = 0;
        if (wr->num_sge)
            memcpy(&qp->rq_sge[(size_t)slot * qp->cap_rs], wr->sg_list, sizeof(struct ibv_sge) * (size_t)wr->num_sge);
        qp->rq_count++;
    }
    pthread_mutex_unlock(&qp->mu);
    if (err && bad)
        *bad = wr;
    return err;
}

/* ------------------------------------------------------------------------ */
/* Devices and contexts                                                      */
/* ------------------------------------------------------------------------ */
FV_API struct ibv_device **ibv_get_device_list(int *num_devices)
{
    configure();
    struct ibv_device **list = calloc((size_t)g_ndev + 1, sizeof *list);
    if (!list) {
        errno = ENOMEM;
        return NULL;
    }
    for (int i = 0; i < g_ndev; i++)
        list[i] = &g_devs[i].ibdev;
    if (num_devices)
        *num_devices = g_ndev;
    return list;
}

FV_API void ibv_free_device_list(struct ibv_device **list) { free(list); }

FV_API const char *ibv_get_device_name(struct ibv_device *device)
{
    struct fdev *d = dev_of(device);
    return d ? d->ibdev.name : NULL;
}

FV_API __be64 ibv_get_device_guid(struct ibv_device *device)
{
    struct fdev *d = dev_of(device);
    return d ? htobe64(d->guid) : 0;
}

FV_API int ibv_fork_init(void) { return 0; }

FV_API struct ibv_context *ibv_open_device(struct ibv_device *device)
{
    struct fdev *d = dev_of(device);
    if (!d) {
        errno = ENODEV;
        return NULL;
    }
    pthread_mutex_lock(&d->mu);
    int rc = dev_start_locked(d);
    pthread_mutex_unlock(&d->mu);
    if (rc)
        return NULL;
    struct fctx *c = calloc(1, sizeof *c);
    if (!c) {
        errno = ENOMEM;
        return NULL;
    }
    c->d = d;
    pthread_mutex_init(&c->mu, NULL);
    c->ctx.device = &d->ibdev;
    c->ctx.cmd_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    c->ctx.async_fd = eventfd(0, EFD_CLOEXEC);
    if (c->ctx.cmd_fd < 0 || c->ctx.async_fd < 0) {
        int e = errno;
        if (c->ctx.cmd_fd >= 0)
            close(c->ctx.cmd_fd);
        if (c->ctx.async_fd >= 0)
            close(c->ctx.async_fd);
        free(c);
        errno = e;
        return NULL;
    }
    fd_reg(c->ctx.cmd_fd);
    fd_reg(c->ctx.async_fd);
    c->ctx.num_comp_vectors = FV_COMP_VECTORS;
    pthread_mutex_init(&c->ctx.mutex, NULL);
    c->ctx.abi_compat = NULL; /* no extended verbs */
    c->ctx.ops.poll_cq = fv_poll_cq;
    c->ctx.ops.req_notify_cq = fv_req_notify_cq;
    c->ctx.ops.post_send = fv_post_send;
    c->ctx.ops.post_recv = fv_post_recv;
    atomic_fetch_add(&g_live_ctx, 1);
    return &c->ctx;
}

FV_API int ibv_query_device(struct ibv_context *context, struct ibv_device_attr *a)
{
    if (!context || !a)
        return EINVAL;
    struct fdev *d = ((struct fctx *)context)->d;
    memset(a, 0, sizeof *a);
    snprintf(a->fw_ver, sizeof a->fw_ver, "16.35.2000");
    a->node_guid = htobe64(d->guid);
    a->sys_image_guid = htobe64(d->guid);
    a->max_mr_size = d->maxmr;
    a->page_size_cap = ~0xfffull;
    a->vendor_id = 0x02c9;
    a->vendor_part_id = 4119;
    a->hw_ver = 0;
    a->max_qp = 65536;
    a->max_qp_wr = g_max_qp_wr;
    a->device_cap_flags = IBV_DEVICE_BAD_PKEY_CNTR | IBV_DEVICE_BAD_QKEY_CNTR | IBV_DEVICE_CHANGE_PHY_PORT |
                          IBV_DEVICE_PORT_ACTIVE_EVENT | IBV_DEVICE_SYS_IMAGE_GUID | IBV_DEVICE_RC_RNR_NAK_GEN;
    a->max_sge = FV_MAX_SGE;
    a->max_sge_rd = FV_MAX_SGE;
    a->max_cq = 1 << 24;
    a->max_cqe = g_max_cqe;
    a->max_mr = FV_MAX_MR;
    a->max_pd = 1 << 24;
    a->max_qp_rd_atom = FV_MAX_RD_ATOM;
    a->max_res_rd_atom = FV_MAX_RD_ATOM * 65536;
    a->max_qp_init_rd_atom = FV_MAX_RD_ATOM;
    a->atomic_cap = IBV_ATOMIC_NONE;
    a->max_pkeys = d->is_ib ? FV_IB_PKEYS : 1;
    a->local_ca_ack_delay = 16;
    a->phys_port_cnt = 1;
    return 0;
}

FV_API int ibv_query_port(struct ibv_context *context, uint8_t port_num, struct _compat_ibv_port_attr *p)
{
    if (!context || !p || port_num != 1) {
        errno = EINVAL;
        return EINVAL;
    }
    struct fdev *d = ((struct fctx *)context)->d;
    int down = dev_down(d);
    memset(p, 0, sizeof *p);
    p->state = down ? IBV_PORT_DOWN : IBV_PORT_ACTIVE;
    p->max_mtu = d->mtu;
    p->active_mtu = d->mtu;
    p->gid_tbl_len = d->is_ib ? 1 : FV_ROCE_GIDS;
    p->port_cap_flags = d->is_ib ? (IBV_PORT_CM_SUP | IBV_PORT_SYS_IMAGE_GUID_SUP | IBV_PORT_TRAP_SUP)
                                 : (IBV_PORT_CM_SUP | IBV_PORT_IP_BASED_GIDS);
    p->max_msg_sz = FV_MAX_MSG;
    p->pkey_tbl_len = d->is_ib ? FV_IB_PKEYS : 1;
    p->lid = d->is_ib ? d->lid : 0;
    p->sm_lid = d->is_ib ? 1 : 0;
    p->lmc = 0;
    p->max_vl_num = d->is_ib ? 4 : 1;
    p->sm_sl = 0;
    p->subnet_timeout = d->is_ib ? 18 : 0;
    p->active_width = 2;  /* 4X */
    p->active_speed = 32; /* EDR */
    p->phys_state = down ? 3 : 5; /* Disabled / LinkUp */
    p->link_layer = d->is_ib ? IBV_LINK_LAYER_INFINIBAND : IBV_LINK_LAYER_ETHERNET;
    return 0;
}

static int gid_entry(struct fdev *d, uint32_t index, struct ibv_gid_entry *e)
{
    memset(e, 0, sizeof *e);
    e->gid_index = index;
    e->port_num = 1;
    if (d->is_ib) {
        if (index != 0)
            return -1;
        e->gid.raw[0] = 0xfe;
        e->gid.raw[1] = 0x80;
        e->gid.global.interface_id = htobe64(d->guid);
        e->gid_type = IBV_GID_TYPE_IB;
        e->ndev_ifindex = 0;
        return 0;
    }
    if (index >= FV_ROCE_GIDS)
        return -1;
    if (index < 2) {
        e->gid.raw[0] = 0xfe;
        e->gid.raw[1] = 0x80;
    } else {
        e->gid.raw[10] = 0xff;
        e->gid.raw[11] = 0xff;
    }
    memcpy(&e->gid.raw[12], d->ip, 4);
    e->gid_type = (index & 1) ? IBV_GID_TYPE_ROCE_V2 : IBV_GID_TYPE_ROCE_V1;
    e->ndev_ifindex = if_nametoindex("lo");
    return 0;
}

FV_API int ibv_query_gid(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid)
{
    struct ibv_gid_entry e;
    if (!context || !gid || port_num != 1 || index < 0 ||
        gid_entry(((struct fctx *)context)->d, (uint32_t)index, &e)) {
        errno = EINVAL;
        return -1;
    }
    *gid = e.gid;
    return 0;
}

FV_API int _ibv_query_gid_ex(struct ibv_context *context, uint32_t port_num, uint32_t gid_index,
                             struct ibv_gid_entry *entry, uint32_t flags, size_t entry_size)
{
    struct ibv_gid_entry e;
    if (!context || !entry || flags || entry_size < sizeof e || port_num != 1 ||
        gid_entry(((struct fctx *)context)->d, gid_index, &e)) {
        errno = EINVAL;
        return EINVAL;
    }
    memcpy(entry, &e, sizeof e);
    return 0;
}

FV_API ssize_t _ibv_query_gid_table(struct ibv_context *context, struct ibv_gid_entry *entries, size_t max_entries,
                                    uint32_t flags, size_t entry_size)
{
    if (!context || (!entries && max_entries) || flags || entry_size < sizeof(struct ibv_gid_entry)) {
        errno = EINVAL;
        return -EINVAL;
    }
    struct fdev *d = ((struct fctx *)context)->d;
    size_t n = d->is_ib ? 1 : FV_ROCE_GIDS;
    if (max_entries < n) {
        errno = EINVAL;
        return -EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        struct ibv_gid_entry e;
        gid_entry(d, (uint32_t)i, &e);
        memcpy((char *)entries + i * entry_size, &e, sizeof e);
    }
    return (ssize_t)n;
}

FV_API int ibv_query_pkey(struct ibv_context *context, uint8_t port_num, int index, __be16 *pkey)
{
    if (!context || !pkey || port_num != 1 || index < 0 ||
        index >= (((struct fctx *)context)->d->is_ib ? FV_IB_PKEYS : 1)) {
        errno = EINVAL;
        return -1;
    }
    *pkey = htobe16(index == 0 ? 0xffff : 0);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* PDs and MRs                                                               */
/* ------------------------------------------------------------------------ */
static atomic_uint g_handles;

FV_API struct ibv_pd *ibv_alloc_pd(struct ibv_context *context)
{
    if (!context) {
        errno = EINVAL;
        return NULL;
    }
    struct fctx *c = (struct fctx *)context;
    struct fpd *pd = calloc(1, sizeof *pd);
    if (!pd) {
        errno = ENOMEM;
        return NULL;
    }
    pd->pd.context = context;
    pd->pd.handle = atomic_fetch_add(&g_handles, 1) + 1;
    pd->c = c;
    pthread_mutex_lock(&c->mu);
    pd->cnext = c->pds;
    c->pds = pd;
    pthread_mutex_unlock(&c->mu);
    atomic_fetch_add(&g_live_pds, 1);
    return &pd->pd;
}

static int dealloc_pd(struct fpd *pd, int force)
{
    struct fctx *c = pd->c;
    pthread_mutex_lock(&c->mu);
    if (pd->refs && !force) {
        pthread_mutex_unlock(&c->mu);
        return EBUSY;
    }
    for (struct fpd **pp = &c->pds; *pp; pp = &(*pp)->cnext)
        if (*pp == pd) {
            *pp = pd->cnext;
            break;
        }
    pthread_mutex_unlock(&c->mu);
    free(pd);
    atomic_fetch_sub(&g_live_pds, 1);
    return 0;
}

FV_API int ibv_dealloc_pd(struct ibv_pd *pd)
{
    if (!pd)
        return EINVAL;
    int rc = dealloc_pd((struct fpd *)pd, 0);
    if (rc)
        errno = rc;
    return rc;
}

/* Is [a, a+n) mapped readable (and writable if asked)? 1 if unknown. */
static int range_mapped(uintptr_t a, size_t n, int need_write)
{
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f)
        return 1;
    char *line = NULL;
    size_t cap = 0;
    uintptr_t cur = a, end = a + n;
    int ok = 0;
    while (getline(&line, &cap, f) > 0) {
        unsigned long s, e;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &s, &e, perms) != 3)
            continue;
        if (e <= cur)
            continue;
        if (s > cur)
            break;
        if (perms[0] != 'r' || (need_write && perms[1] != 'w'))
            break;
        cur = e;
        if (cur >= end) {
            ok = 1;
            break;
        }
    }
    free(line);
    fclose(f);
    return ok;
}

/* Registers [addr, addr+length) as iova..; `dmabuf_map` (a mapping of
 * `map_len` bytes made by ibv_reg_dmabuf_mr, which addr lies in) is the
 * MR's own, unmapped at deregistration, and the MR's public addr is
 * `public_addr` (rdma-core reports the dmabuf offset there). */
static struct ibv_mr *reg_mr_at(struct ibv_pd *ibpd, void *addr, size_t length, uint64_t iova, unsigned access,
                                void *dmabuf_map, size_t map_len, void *public_addr);

static struct ibv_mr *reg_mr(struct ibv_pd *ibpd, void *addr, size_t length, uint64_t iova, unsigned access)
{
    return reg_mr_at(ibpd, addr, length, iova, access, NULL, 0, addr);
}

static struct ibv_mr *reg_mr_at(struct ibv_pd *ibpd, void *addr, size_t length, uint64_t iova, unsigned access,
                                void *dmabuf_map, size_t map_len, void *public_addr)
{
    if (!ibpd) {
        errno = EINVAL;
        return NULL;
    }
    struct fpd *pd = (struct fpd *)ibpd;
    struct fctx *c = pd->c;
    struct fdev *d = c->d;
    const unsigned known = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                           IBV_ACCESS_REMOTE_ATOMIC | IBV_ACCESS_MW_BIND | IBV_ACCESS_HUGETLB;
    access &= ~(unsigned)IBV_ACCESS_OPTIONAL_RANGE; /* optional: ignored when unsupported */
    if ((access & ~known) ||
        ((access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC)) && !(access & IBV_ACCESS_LOCAL_WRITE)) ||
        length == 0 || length > d->maxmr || (uintptr_t)addr + length < (uintptr_t)addr || iova + length < iova) {
        errno = EINVAL;
        return NULL;
    }
    int writable = (access & (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC |
                              IBV_ACCESS_MW_BIND)) != 0;
    if (!range_mapped((uintptr_t)addr, length, writable)) {
        errno = EFAULT;
        return NULL;
    }
    struct fmr *m = calloc(1, sizeof *m);
    if (!m) {
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_lock(&d->mu);
    if (d->nmr >= FV_MAX_MR) {
        pthread_mutex_unlock(&d->mu);
        free(m);
        errno = ENOMEM;
        return NULL;
    }
    d->nmr++;
    uint32_t v;
    do {
        uint32_t ctr = d->key_ctr++;
        v = ((ctr * 0x6b43a9b5u) ^ d->key_base) & 0x7fffffffu;
    } while (v == 0);
    pthread_mutex_unlock(&d->mu);
    m->mr.context = &c->ctx;
    m->mr.pd = ibpd;
    m->mr.addr = public_addr;
    m->host = addr;
    if (dmabuf_map) {
        m->map_len = map_len;
        atomic_fetch_add(&g_live_dmabuf_mrs, 1);
    }
    m->mr.length = length;
    m->mr.handle = atomic_fetch_add(&g_handles, 1) + 1;
    m->mr.lkey = v << 1;
    m->mr.rkey = (v << 1) | 1u;
    m->d = d;
    m->pd = pd;
    m->iova = iova;
    m->access = access;
    pthread_mutex_lock(&c->mu);
    pd->refs++;
    m->cnext = c->mrs;
    c->mrs = m;
    pthread_mutex_unlock(&c->mu);
    pthread_rwlock_wrlock(&d->mr_rw);
    unsigned hl = mr_hash(m->mr.lkey), hr = mr_hash(m->mr.rkey);
    m->lnext = d->by_lkey[hl];
    d->by_lkey[hl] = m;
    m->rnext = d->by_rkey[hr];
    d->by_rkey[hr] = m;
    pthread_rwlock_unlock(&d->mr_rw);
    atomic_fetch_add(&g_live_mrs, 1);
    return &m->mr;
}

static struct ibv_mr *counted(struct ibv_mr *mr)
{
    if (!mr)
        atomic_fetch_add(&g_reg_refused, 1);
    return mr;
}

FV_API struct ibv_mr *ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length, int access)
{
    return counted(reg_mr(pd, addr, length, (uintptr_t)addr, (unsigned)access));
}

FV_API struct ibv_mr *ibv_reg_mr_iova(struct ibv_pd *pd, void *addr, size_t length, uint64_t iova, int access)
{
    return counted(reg_mr(pd, addr, length, iova, (unsigned)access));
}

FV_API struct ibv_mr *ibv_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t length, uint64_t iova,
                                       unsigned int access)
{
    return counted(reg_mr(pd, addr, length, iova, access));
}

FV_API struct ibv_mr *ibv_reg_dmabuf_mr(struct ibv_pd *pd, uint64_t offset, size_t length, uint64_t iova, int fd,
                                        int access)
{
    if (!pd || fd < 0 || length == 0 || offset + length < offset) {
        errno = EINVAL;
        return counted(NULL);
    }
    if (getenv("FAKE_IBV_NO_DMABUF") || atomic_load(&g_no_dmabuf)) {
        errno = EOPNOTSUPP; /* a kernel or NIC without dmabuf support */
        return counted(NULL);
    }
    /* The NIC's view of the buffer: the fd mapped into no one's sight (the
     * owner's own mapping of it, e.g. fake CUDA device memory, may be
     * inaccessible to the CPU). The fd may be closed after this returns. */
    struct stat st;
    if (fstat(fd, &st) || (uint64_t)st.st_size < offset + length) {
        errno = EINVAL;
        return counted(NULL);
    }
    long pg = sysconf(_SC_PAGESIZE);
    uint64_t start = offset & ~(uint64_t)(pg - 1);
    size_t map_len = (size_t)(offset + length - start);
    int prot = PROT_READ | (((unsigned)access & (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE)) ? PROT_WRITE : 0);
    char *map = mmap(NULL, map_len, prot, MAP_SHARED, fd, (off_t)start);
    if (map == MAP_FAILED) {
        errno = EFAULT;
        return counted(NULL);
    }
    struct ibv_mr *mr = reg_mr_at(pd, map + (offset - start), length, iova, (unsigned)access, map, map_len,
                                  (void *)(uintptr_t)offset);
    if (!mr) {
        int e = errno;
        munmap(map, map_len);
        errno = e;
    }
    return counted(mr);
}

static void dereg_mr(struct fmr *m)
{
    struct fdev *d = m->d;
    struct fctx *c = m->pd->c;
    pthread_rwlock_wrlock(&d->mr_rw); /* waits for copies in progress */
    for (struct fmr **pp = &d->by_lkey[mr_hash(m->mr.lkey)]; *pp; pp = &(*pp)->lnext)
        if (*pp == m) {
            *pp = m->lnext;
            break;
        }
    for (struct fmr **pp = &d->by_rkey[mr_hash(m->mr.rkey)]; *pp; pp = &(*pp)->rnext)
        if (*pp == m) {
            *pp = m->rnext;
            break;
        }
    pthread_rwlock_unlock(&d->mr_rw);
    pthread_mutex_lock(&d->mu);
    d->nmr--;
    pthread_mutex_unlock(&d->mu);
    pthread_mutex_lock(&c->mu);
    for (struct fmr **pp = &c->mrs; *pp; pp = &(*pp)->cnext)
        if (*pp == m) {
            *pp = m->cnext;
            break;
        }
    m->pd->refs--;
    pthread_mutex_unlock(&c->mu);
    if (m->map_len) {
        long pg = sysconf(_SC_PAGESIZE);
        munmap((char *)((uintptr_t)m->host & ~(uintptr_t)(pg - 1)), m->map_len);
        atomic_fetch_sub(&g_live_dmabuf_mrs, 1);
    }
    free(m);
    atomic_fetch_sub(&g_live_mrs, 1);
}

FV_API int ibv_dereg_mr(struct ibv_mr *mr)
{
    if (!mr) {
        errno = EINVAL;
        return EINVAL;
    }
    dereg_mr((struct fmr *)mr);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Completion channels and CQs                                               */
/* ------------------------------------------------------------------------ */
FV_API struct ibv_comp_channel *ibv_create_comp_channel(struct ibv_context *context)
{
    if (!context) {
        errno = EINVAL;
        return NULL;
    }
    struct fctx *c = (struct fctx *)context;
    struct fch *ch = calloc(1, sizeof *ch);
    int sv[2];
    if (!ch) {
        errno = ENOMEM;
        return NULL;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) {
        int e = errno;
        free(ch);
        errno = e;
        return NULL;
    }
    fd_reg(sv[0]);
    fd_reg(sv[1]);
    fcntl(sv[1], F_SETFL, O_NONBLOCK);
    ch->ch.context = context;
    ch->ch.fd = sv[0];
    ch->ch.refcnt = 0;
    ch->wfd = sv[1];
    ch->c = c;
    pthread_mutex_init(&ch->mu, NULL);
    pthread_mutex_lock(&c->mu);
    ch->cnext = c->chs;
    c->chs = ch;
    pthread_mutex_unlock(&c->mu);
    return &ch->ch;
}

static int destroy_channel(struct fch *ch, int force)
{
    struct fctx *c = ch->c;
    pthread_mutex_lock(&c->mu);
    if (ch->ch.refcnt && !force) {
        pthread_mutex_unlock(&c->mu);
        return EBUSY;
    }
    for (struct fch **pp = &c->chs; *pp; pp = &(*pp)->cnext)
        if (*pp == ch) {
            *pp = ch->cnext;
            break;
        }
    pthread_mutex_unlock(&c->mu);
    while (ch->head) {
        struct evnode *e = ch->head;
        ch->head = e->next;
        free(e);
    }
    fd_close(ch->ch.fd);
    fd_close(ch->wfd);
    free(ch);
    return 0;
}

FV_API int ibv_destroy_comp_channel(struct ibv_comp_channel *channel)
{
    if (!channel) {
        errno = EINVAL;
        return EINVAL;
    }
    int rc = destroy_channel((struct fch *)channel, 0);
    if (rc)
        errno = rc;
    return rc;
}

FV_API struct ibv_cq *ibv_create_cq(struct ibv_context *context, int cqe, void *cq_context,
                                    struct ibv_comp_channel *channel, int comp_vector)
{
    if (!context || cqe < 1 || cqe > g_max_cqe || comp_vector < 0 || comp_vector >= context->num_comp_vectors ||
        (channel && channel->context != context)) {
        errno = EINVAL;
        return NULL;
    }
    struct fctx *c = (struct fctx *)context;
    struct fcq *cq = calloc(1, sizeof *cq);
    if (!cq) {
        errno = ENOMEM;
        return NULL;
    }
    cq->cap = (int)(pow2_at_least((uint32_t)cqe + 1) - 1);
    cq->ring = calloc((size_t)cq->cap, sizeof *cq->ring);
    if (!cq->ring) {
        free(cq);
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_init(&cq->mu, NULL);
    cq->c = c;
    cq->ch = (struct fch *)channel;
    cq->cq.context = context;
    cq->cq.channel = channel;
    cq->cq.cq_context = cq_context;
    cq->cq.handle = atomic_fetch_add(&g_handles, 1) + 1;
    cq->cq.cqe = cq->cap;
    pthread_mutex_init(&cq->cq.mutex, NULL);
    pthread_cond_init(&cq->cq.cond, NULL);
    pthread_mutex_lock(&c->mu);
    if (channel)
        channel->refcnt++;
    cq->cnext = c->cqs;
    c->cqs = cq;
    pthread_mutex_unlock(&c->mu);
    atomic_fetch_add(&g_live_cqs, 1);
    return &cq->cq;
}

static int destroy_cq(struct fcq *cq, int force)
{
    struct fctx *c = cq->c;
    struct fch *ch = cq->ch;
    int removed = 0;
    pthread_mutex_lock(&cq->mu);
    if (cq->nqp && !force) {
        pthread_mutex_unlock(&cq->mu);
        return EBUSY;
    }
    if (ch) {
        pthread_mutex_lock(&ch->mu);
        if (cq->ev_reported != atomic_load(&cq->ev_acked) && !force) {
            pthread_mutex_unlock(&ch->mu);
            pthread_mutex_unlock(&cq->mu);
            return EBUSY;
        }
        struct evnode **pp = &ch->head;
        ch->tail = NULL;
        while (*pp) {
            struct evnode *e = *pp;
            if (e->cq == cq) {
                *pp = e->next;
                free(e);
                removed++;
            } else {
                ch->tail = e;
                pp = &e->next;
            }
        }
        char tmp[64];
        while (removed > 0) {
            ssize_t k = recv(ch->ch.fd, tmp, removed > 64 ? 64 : (size_t)removed, MSG_DONTWAIT);
            if (k <= 0)
                break;
            removed -= (int)k;
        }
        pthread_mutex_unlock(&ch->mu);
    }
    pthread_mutex_unlock(&cq->mu);
    pthread_mutex_lock(&c->mu);
    for (struct fcq **pp = &c->cqs; *pp; pp = &(*pp)->cnext)
        if (*pp == cq) {
            *pp = cq->cnext;
            break;
        }
    if (ch)
        ch->ch.refcnt--;
    pthread_mutex_unlock(&c->mu);
    free(cq->ring);
    free(cq);
    atomic_fetch_sub(&g_live_cqs, 1);
    return 0;
}

FV_API int ibv_destroy_cq(struct ibv_cq *cq)
{
    if (!cq) {
        errno = EINVAL;
        return EINVAL;
    }
    int rc = destroy_cq((struct fcq *)cq, 0);
    if (rc)
        errno = rc;
    return rc;
}

FV_API int ibv_get_cq_event(struct ibv_comp_channel *channel, struct ibv_cq **cq, void **cq_context)
{
    if (!channel || !cq || !cq_context) {
        errno = EINVAL;
        return -1;
    }
    struct fch *ch = (struct fch *)channel;
    for (;;) {
        char b;
        ssize_t k = read(ch->ch.fd, &b, 1);
        if (k < 0 && errno == EINTR)
            continue;
        if (k != 1) {
            if (k == 0)
                errno = EIO;
            return -1;
        }
        pthread_mutex_lock(&ch->mu);
        struct evnode *e = ch->head;
        if (e) {
            ch->head = e->next;
            if (!ch->head)
                ch->tail = NULL;
            e->cq->ev_reported++;
        }
        pthread_mutex_unlock(&ch->mu);
        if (!e)
            continue; /* its CQ was destroyed meanwhile */
        *cq = &e->cq->cq;
        *cq_context = e->cq->cq.cq_context;
        free(e);
        return 0;
    }
}

FV_API void ibv_ack_cq_events(struct ibv_cq *ibcq, unsigned int nevents)
{
    if (!ibcq)
        return;
    struct fcq *cq = (struct fcq *)ibcq;
    pthread_mutex_lock(&cq->cq.mutex);
    cq->cq.comp_events_completed += nevents;
    pthread_cond_signal(&cq->cq.cond);
    pthread_mutex_unlock(&cq->cq.mutex);
    atomic_fetch_add(&cq->ev_acked, nevents);
}

/* ------------------------------------------------------------------------ */
/* QPs                                                                       */
/* ------------------------------------------------------------------------ */
FV_API struct ibv_qp *ibv_create_qp(struct ibv_pd *ibpd, struct ibv_qp_init_attr *ia)
{
    if (!ibpd || !ia) {
        errno = EINVAL;
        return NULL;
    }
    struct fpd *pd = (struct fpd *)ibpd;
    struct fctx *c = pd->c;
    struct fdev *d = c->d;
    struct ibv_qp_cap *cap = &ia->cap;
    if (ia->qp_type != IBV_QPT_RC || !ia->send_cq || !ia->recv_cq || ia->srq || ia->send_cq->context != &c->ctx ||
        ia->recv_cq->context != &c->ctx || cap->max_send_wr > (uint32_t)g_max_qp_wr ||
        cap->max_recv_wr > (uint32_t)g_max_qp_wr || cap->max_send_sge > FV_MAX_SGE ||
        cap->max_recv_sge > FV_MAX_SGE || cap->max_inline_data > FV_MAX_INLINE) {
        errno = EINVAL;
        return NULL;
    }
    struct fqp *qp = calloc(1, sizeof *qp);
    if (!qp) {
        errno = ENOMEM;
        return NULL;
    }
    qp->cap_sw = cap->max_send_wr ? pow2_at_least(cap->max_send_wr) : 0;
    if (qp->cap_sw > (uint32_t)g_max_qp_wr)
        qp->cap_sw = (uint32_t)g_max_qp_wr;
    qp->cap_rw = cap->max_recv_wr ? pow2_at_least(cap->max_recv_wr) : 0;
    if (qp->cap_rw > (uint32_t)g_max_qp_wr)
        qp->cap_rw = (uint32_t)g_max_qp_wr;
    qp->cap_ss = cap->max_send_sge;
    qp->cap_rs = cap->max_recv_sge;
    qp->cap_inl = cap->max_inline_data;
    size_t nsw = qp->cap_sw ? qp->cap_sw : 1, nrw = qp->cap_rw ? qp->cap_rw : 1;
    qp->sq = xcalloc(nsw, sizeof *qp->sq);
    qp->sq_sge = xcalloc(nsw * qp->cap_ss, sizeof *qp->sq_sge);
    qp->sq_inl = xcalloc(nsw * qp->cap_inl, 1);
    qp->rq = xcalloc(nrw, sizeof *qp->rq);
    qp->rq_sge = xcalloc(nrw * qp->cap_rs, sizeof *qp->rq_sge);
    qp->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!qp->sq || !qp->sq_sge || !qp->sq_inl || !qp->rq || !qp->rq_sge || qp->wake_fd < 0) {
        int e = qp->wake_fd < 0 ? errno : ENOMEM;
        if (qp->wake_fd >= 0)
            close(qp->wake_fd);
        free(qp->sq);
        free(qp->sq_sge);
        free(qp->sq_inl);
        free(qp->rq);
        free(qp->rq_sge);
        free(qp);
        errno = e;
        return NULL;
    }
    fd_reg(qp->wake_fd);
    qp->c = c;
    qp->d = d;
    qp->pd = pd;
    qp->scq = (struct fcq *)ia->send_cq;
    qp->rcq = (struct fcq *)ia->recv_cq;
    qp->sig_all = ia->sq_sig_all != 0;
    qp->st = IBV_QPS_RESET;
    qp->serving_fd = -1;
    pthread_mutex_init(&qp->mu, NULL);
    pthread_cond_init(&qp->cv, NULL);
    pthread_mutex_init(&qp->resp_mu, NULL);
    pthread_mutex_lock(&d->mu);
    int idx = -1;
    for (int i = 0; i < FV_QPS_PER_DEV; i++)
        if (!d->qps[i]) {
            idx = i;
            break;
        }
    if (idx < 0) {
        pthread_mutex_unlock(&d->mu);
        fd_close(qp->wake_fd);
        free(qp->sq);
        free(qp->sq_sge);
        free(qp->sq_inl);
        free(qp->rq);
        free(qp->rq_sge);
        free(qp);
        errno = ENOMEM;
        return NULL;
    }
    qp->idx = idx;
    qp->qp.qp_num = ((uint32_t)d->slot << 12) | (uint32_t)idx;
    qp->qp.context = &c->ctx;
    qp->qp.qp_context = ia->qp_context;
    qp->qp.pd = ibpd;
    qp->qp.send_cq = ia->send_cq;
    qp->qp.recv_cq = ia->recv_cq;
    qp->qp.srq = NULL;
    qp->qp.handle = atomic_fetch_add(&g_handles, 1) + 1;
    qp->qp.state = IBV_QPS_RESET;
    qp->qp.qp_type = IBV_QPT_RC;
    pthread_mutex_init(&qp->qp.mutex, NULL);
    pthread_cond_init(&qp->qp.cond, NULL);
    d->qps[idx] = qp;
    pthread_mutex_unlock(&d->mu);
    pthread_mutex_lock(&qp->scq->mu);
    qp->scq->nqp++;
    pthread_mutex_unlock(&qp->scq->mu);
    pthread_mutex_lock(&qp->rcq->mu);
    qp->rcq->nqp++;
    pthread_mutex_unlock(&qp->rcq->mu);
    pthread_mutex_lock(&c->mu);
    pd->refs++;
    qp->cnext = c->qps;
    c->qps = qp;
    pthread_mutex_unlock(&c->mu);
    cap->max_send_wr = qp->cap_sw;
    cap->max_recv_wr = qp->cap_rw;
    atomic_fetch_add(&g_live_qps, 1);
    return &qp->qp;
}

/* the kernel's RC transition table: required and optional attribute bits */
static int qp_transition(int cur, int next, int *req, int *opt)
{
    *req = 0;
    *opt = 0;
    if (next == IBV_QPS_RESET || next == IBV_QPS_ERR)
        return 0;
    switch (cur) {
    case IBV_QPS_RESET:
        if (next == IBV_QPS_INIT) {
            *req = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
            return 0;
        }
        break;
    case IBV_QPS_INIT:
        if (next == IBV_QPS_INIT) {
            *opt = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
            return 0;
        }
        if (next == IBV_QPS_RTR) {
            *req = IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                   IBV_QP_MIN_RNR_TIMER;
            *opt = IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX;
            return 0;
        }
        break;
    case IBV_QPS_RTR:
        if (next == IBV_QPS_RTS) {
            *req = IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
            *opt = IBV_QP_CUR_STATE | IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER |
                   IBV_QP_PATH_MIG_STATE;
            return 0;
        }
        break;
    case IBV_QPS_RTS:
        if (next == IBV_QPS_RTS) {
            *opt = IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_ALT_PATH | IBV_QP_PATH_MIG_STATE |
                   IBV_QP_MIN_RNR_TIMER;
            return 0;
        }
        break;
    default: break;
    }
    return -1;
}

static int modify_qp(struct fqp *qp, struct ibv_qp_attr *attr, int mask)
{
    struct fdev *d = qp->d;
    int cur = qp->st, req, opt;
    if (!attr)
        return EINVAL;
    if ((mask & IBV_QP_CUR_STATE) && (int)attr->cur_qp_state != cur)
        return EINVAL;
    int next = (mask & IBV_QP_STATE) ? (int)attr->qp_state : cur;
    if (next < IBV_QPS_RESET || next > IBV_QPS_ERR || next == IBV_QPS_SQD || next == IBV_QPS_SQE)
        return EINVAL;
    if (qp_transition(cur, next, &req, &opt))
        return EINVAL;
    if ((mask & req) != req || (mask & ~(req | opt | IBV_QP_STATE)))
        return EINVAL;
    if ((mask & IBV_QP_PORT) && attr->port_num != 1)
        return EINVAL;
    if ((mask & IBV_QP_PKEY_INDEX) && attr->pkey_index >= (d->is_ib ? FV_IB_PKEYS : 1))
        return EINVAL;
    if ((mask & IBV_QP_ACCESS_FLAGS) &&
        (attr->qp_access_flags & ~(unsigned)(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                                             IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC)))
        return EINVAL;
    if ((mask & IBV_QP_PATH_MTU) && (attr->path_mtu < IBV_MTU_256 || attr->path_mtu > d->mtu))
        return EINVAL;
    if (mask & IBV_QP_AV) {
        const struct ibv_ah_attr *ah = &attr->ah_attr;
        if (ah->port_num != 1)
            return EINVAL;
        if (!d->is_ib && (!ah->is_global || ah->grh.sgid_index >= FV_ROCE_GIDS))
            return EINVAL;
        if (d->is_ib && ah->is_global && ah->grh.sgid_index >= 1)
            return EINVAL;
    }
    if ((mask & IBV_QP_DEST_QPN) && attr->dest_qp_num > 0xffffff)
        return EINVAL;
    if ((mask & IBV_QP_MAX_DEST_RD_ATOMIC) && attr->max_dest_rd_atomic > FV_MAX_RD_ATOM)
        return EINVAL;
    if ((mask & IBV_QP_MAX_QP_RD_ATOMIC) && attr->max_rd_atomic > FV_MAX_RD_ATOM)
        return EINVAL;
    if ((mask & IBV_QP_TIMEOUT) && attr->timeout > 31)
        return EINVAL;
    if ((mask & IBV_QP_RETRY_CNT) && attr->retry_cnt > 7)
        return EINVAL;
    if ((mask & IBV_QP_RNR_RETRY) && attr->rnr_retry > 7)
        return EINVAL;
    if ((mask & IBV_QP_MIN_RNR_TIMER) && attr->min_rnr_timer > 31)
        return EINVAL;

    if (next == IBV_QPS_RESET) {
        qp_reset_locked(qp);
        return 0;
    }
    if (next == IBV_QPS_ERR) {
        qp_to_err_locked(qp);
        return 0;
    }
    struct ibv_qp_attr *a = &qp->a;
    if (mask & IBV_QP_PORT)
        a->port_num = attr->port_num;
    if (mask & IBV_QP_PKEY_INDEX)
        a->pkey_index = attr->pkey_index;
    if (mask & IBV_QP_ACCESS_FLAGS)
        a->qp_access_flags = attr->qp_access_flags;
    if (mask & IBV_QP_PATH_MTU)
        a->path_mtu = attr->path_mtu;
    if (mask & IBV_QP_AV)
        a->ah_attr = attr->ah_attr;
    if (mask & IBV_QP_ALT_PATH) {
        a->alt_ah_attr = attr->alt_ah_attr;
        a->alt_pkey_index = attr->alt_pkey_index;
        a->alt_port_num = attr->alt_port_num;
        a->alt_timeout = attr->alt_timeout;
    }
    if (mask & IBV_QP_PATH_MIG_STATE)
        a->path_mig_state = attr->path_mig_state;
    if (mask & IBV_QP_DEST_QPN)
        a->dest_qp_num = attr->dest_qp_num;
    if (mask & IBV_QP_RQ_PSN)
        a->rq_psn = attr->rq_psn & 0xffffff;
    if (mask & IBV_QP_SQ_PSN)
        a->sq_psn = attr->sq_psn & 0xffffff;
    if (mask & IBV_QP_MAX_DEST_RD_ATOMIC)
        a->max_dest_rd_atomic = attr->max_dest_rd_atomic;
    if (mask & IBV_QP_MAX_QP_RD_ATOMIC)
        a->max_rd_atomic = attr->max_rd_atomic;
    if (mask & IBV_QP_MIN_RNR_TIMER)
        a->min_rnr_timer = attr->min_rnr_timer;
    if (mask & IBV_QP_TIMEOUT)
        a->timeout = attr->timeout;
    if (mask & IBV_QP_RETRY_CNT)
        a->retry_cnt = attr->retry_cnt;
    if (mask & IBV_QP_RNR_RETRY)
        a->rnr_retry = attr->rnr_retry;
    if (cur == IBV_QPS_INIT && next == IBV_QPS_RTR) {
        const struct ibv_ah_attr *ah = &a->ah_attr;
        if (d->is_ib)
            qp->dest_key = (1ull << 32) | ah->dlid;
        else
            qp->dest_key = (uint64_t)ah->grh.dgid.raw[12] << 24 | (uint64_t)ah->grh.dgid.raw[13] << 16 |
                           (uint64_t)ah->grh.dgid.raw[14] << 8 | ah->grh.dgid.raw[15];
        qp->dest_slot = (int)(a->dest_qp_num >> 12);
        qp->exp_psn = a->rq_psn;
    }
    if (cur == IBV_QPS_RTR && next == IBV_QPS_RTS) {
        qp->next_psn = a->sq_psn;
        if (!qp->thr_started) {
            if (spawn(&qp->thr, requester_main, qp, 0))
                return ENOMEM;
            qp->thr_started = 1;
        }
    }
    qp->st = next;
    pthread_cond_broadcast(&qp->cv);
    return 0;
}

FV_API int ibv_modify_qp(struct ibv_qp *ibqp, struct ibv_qp_attr *attr, int attr_mask)
{
    if (!ibqp) {
        errno = EINVAL;
        return EINVAL;
    }
    struct fqp *qp = (struct fqp *)ibqp;
    pthread_mutex_lock(&qp->mu);
    int rc = modify_qp(qp, attr, attr_mask);
    if (rc == 0 && (attr_mask & IBV_QP_STATE))
        ibqp->state = attr->qp_state;
    pthread_mutex_unlock(&qp->mu);
    if (rc)
        errno = rc;
    return rc;
}

FV_API int ibv_query_qp(struct ibv_qp *ibqp, struct ibv_qp_attr *attr, int attr_mask,
                        struct ibv_qp_init_attr *init_attr)
{
    if (!ibqp || !attr || !init_attr) {
        errno = EINVAL;
        return EINVAL;
    }
    struct fqp *qp = (struct fqp *)ibqp;
    pthread_mutex_lock(&qp->mu);
    *attr = qp->a;
    attr->qp_state = (enum ibv_qp_state)qp->st;
    attr->cur_qp_state = (enum ibv_qp_state)qp->st;
    attr->path_mig_state = IBV_MIG_MIGRATED;
    attr->qkey = 0;
    attr->en_sqd_async_notify = 0;
    attr->sq_draining = 0;
    attr->rate_limit = 0;
    attr->cap.max_send_wr = qp->cap_sw;
    attr->cap.max_recv_wr = qp->cap_rw;
    attr->cap.max_send_sge = qp->cap_ss;
    attr->cap.max_recv_sge = qp->cap_rs;
    attr->cap.max_inline_data = qp->cap_inl;
    memset(init_attr, 0, sizeof *init_attr);
    init_attr->qp_context = ibqp->qp_context;
    init_attr->send_cq = ibqp->send_cq;
    init_attr->recv_cq = ibqp->recv_cq;
    init_attr->srq = NULL;
    init_attr->cap = attr->cap;
    init_attr->qp_type = IBV_QPT_RC;
    init_attr->sq_sig_all = qp->sig_all;
    if (attr_mask & IBV_QP_STATE)
        ibqp->state = (enum ibv_qp_state)qp->st;
    pthread_mutex_unlock(&qp->mu);
    return 0;
}

static void destroy_qp(struct fqp *qp)
{
    struct fdev *d = qp->d;
    struct fctx *c = qp->c;
    pthread_mutex_lock(&d->mu);
    d->qps[qp->idx] = NULL; /* no new requests reach it */
    pthread_mutex_unlock(&d->mu);
    pthread_mutex_lock(&qp->mu);
    atomic_store(&qp->stop, 1);
    atomic_fetch_add(&qp->gen, 1);
    qp->sq_count = 0;
    qp->rq_count = 0;
    if (qp->serving_fd >= 0)
        shutdown(qp->serving_fd, SHUT_RDWR); /* a request being served to it ends now */
    qp_wake_locked(qp);
    int joined = qp->thr_started;
    pthread_mutex_unlock(&qp->mu);
    if (joined)
        pthread_join(qp->thr, NULL);
    pthread_mutex_lock(&d->mu);
    while (qp->refs > 0)
        pthread_cond_wait(&d->cv, &d->mu);
    pthread_mutex_unlock(&d->mu);
    cq_clean(qp->scq, qp);
    if (qp->rcq != qp->scq)
        cq_clean(qp->rcq, qp);
    pthread_mutex_lock(&qp->scq->mu);
    qp->scq->nqp--;
    pthread_mutex_unlock(&qp->scq->mu);
    pthread_mutex_lock(&qp->rcq->mu);
    qp->rcq->nqp--;
    pthread_mutex_unlock(&qp->rcq->mu);
    pthread_mutex_lock(&c->mu);
    for (struct fqp **pp = &c->qps; *pp; pp = &(*pp)->cnext)
        if (*pp == qp) {
            *pp = qp->cnext;
            break;
        }
    qp->pd->refs--;
    pthread_mutex_unlock(&c->mu);
    fd_close(qp->wake_fd);
    free(qp->sq);
    free(qp->sq_sge);
    free(qp->sq_inl);
    free(qp->rq);
    free(qp->rq_sge);
    free(qp);
    atomic_fetch_sub(&g_live_qps, 1);
}

FV_API int ibv_destroy_qp(struct ibv_qp *qp)
{
    if (!qp) {
        errno = EINVAL;
        return EINVAL;
    }
    destroy_qp((struct fqp *)qp);
    return 0;
}

FV_API int ibv_close_device(struct ibv_context *context)
{
    if (!context) {
        errno = EINVAL;
        return -1;
    }
    struct fctx *c = (struct fctx *)context;
    /* the kernel destroys what is left when the device fd closes */
    while (c->qps)
        destroy_qp(c->qps);
    while (c->mrs)
        dereg_mr(c->mrs);
    while (c->cqs)
        destroy_cq(c->cqs, 1);
    while (c->chs)
        destroy_channel(c->chs, 1);
    while (c->pds)
        dealloc_pd(c->pds, 1);
    fd_close(c->ctx.cmd_fd);
    fd_close(c->ctx.async_fd);
    free(c);
    atomic_fetch_sub(&g_live_ctx, 1);
    return 0;
}

FV_API const char *ibv_wc_status_str(enum ibv_wc_status status)
{
    static const char *const s[] = {
        [IBV_WC_SUCCESS] = "success",
        [IBV_WC_LOC_LEN_ERR] = "local length error",
        [IBV_WC_LOC_QP_OP_ERR] = "local QP operation error",
        [IBV_WC_LOC_EEC_OP_ERR] = "local EE context operation error",
        [IBV_WC_LOC_PROT_ERR] = "local protection error",
        [IBV_WC_WR_FLUSH_ERR] = "Work Request Flushed Error",
        [IBV_WC_MW_BIND_ERR] = "memory management operation error",
        [IBV_WC_BAD_RESP_ERR] = "bad response error",
        [IBV_WC_LOC_ACCESS_ERR] = "local access error",
        [IBV_WC_REM_INV_REQ_ERR] = "remote invalid request error",
        [IBV_WC_REM_ACCESS_ERR] = "remote access error",
        [IBV_WC_REM_OP_ERR] = "remote operation error",
        [IBV_WC_RETRY_EXC_ERR] = "transport retry counter exceeded",
        [IBV_WC_RNR_RETRY_EXC_ERR] = "RNR retry counter exceeded",
        [IBV_WC_LOC_RDD_VIOL_ERR] = "local RDD violation error",
        [IBV_WC_REM_INV_RD_REQ_ERR] = "remote invalid RD request",
        [IBV_WC_REM_ABORT_ERR] = "aborted error",
        [IBV_WC_INV_EECN_ERR] = "invalid EE context number",
        [IBV_WC_INV_EEC_STATE_ERR] = "invalid EE context state",
        [IBV_WC_FATAL_ERR] = "fatal error",
        [IBV_WC_RESP_TIMEOUT_ERR] = "response timeout error",
        [IBV_WC_GENERAL_ERR] = "general error",
        [IBV_WC_TM_ERR] = "TM error",
        [IBV_WC_TM_RNDV_INCOMPLETE] = "TM software rendezvous",
    };
    if ((unsigned)status < sizeof s / sizeof s[0] && s[status])
        return s[status];
    return "unknown";
}

/* ------------------------------------------------------------------------ */
/* Test controls (not libibverbs)                                            */
/* ------------------------------------------------------------------------ */
FV_API uint64_t fake_ibv_bytes(const char *dev, int served)
{
    struct fdev *d = dev_by_name(dev);
    if (!d)
        return 0;
    return served ? atomic_load(&d->bytes_in) : atomic_load(&d->bytes_out);
}

FV_API int fake_ibv_live_qps(void) { return atomic_load(&g_live_qps); }
FV_API int fake_ibv_live_mrs(void) { return atomic_load(&g_live_mrs); }
FV_API int fake_ibv_live_dmabuf_mrs(void) { return atomic_load(&g_live_dmabuf_mrs); }
FV_API void fake_ibv_refuse_dmabuf(int refuse) { atomic_store(&g_no_dmabuf, refuse); }
FV_API int fake_ibv_refused_registrations(void) { return atomic_load(&g_reg_refused); }
FV_API int fake_ibv_live_cqs(void) { return atomic_load(&g_live_cqs); }
FV_API int fake_ibv_live_pds(void) { return atomic_load(&g_live_pds); }
FV_API int fake_ibv_live_contexts(void) { return atomic_load(&g_live_ctx); }
FV_API uint64_t fake_ibv_cq_overruns(void) { return atomic_load(&g_overruns); }

FV_API void fake_ibv_drop_link(const char *dev, int dropped)
{
    struct fdev *d = dev_by_name(dev);
    if (d)
        atomic_store(&d->dropped, dropped != 0);
}

FV_API void fake_ibv_set_delay_us(unsigned us)
{
    configure(); /* so a later first configuration does not override it */
    atomic_store(&g_delay_us, us);
}

FV_API void fake_ibv_corrupt_rkeys(unsigned n) { atomic_store(&g_corrupt, n); }

FV_API int fake_ibv_slot(const char *dev)
{
    struct fdev *d = dev_by_name(dev);
    if (!d)
        return -1;
    pthread_mutex_lock(&d->mu);
    int s = d->slot;
    pthread_mutex_unlock(&d->mu);
    return s;
}
