// SPDX-License-Identifier: GPL-2.0
/*
 * TC ingress fast path of the file server.
 *
 * The program owns a connection from its SYN (answered with a SYN cookie, no
 * state), keeps state once the handshake ACK proves the cookie, answers
 * complete GET/HEAD requests for cached files in place, consumes the client's
 * ACKs and closes cleanly. Answers longer than one segment go out as a
 * windowed, ACK-clocked sequence of segments with retransmission
 * (sender.bpf.h). Anything it does not answer exactly as user space would is
 * handed to the kernel's listener with bpf_sk_assign_tcp_reqsk(); from then on
 * the tuple's packets pass untouched.
 */
/* fileserver.h defines struct bpf_timer for the ABI it shares with Python;
 * the kernel's (same layout, same name in the program's BTF) steps aside */
#define bpf_timer bpf_timer___vmlinux
#include "vmlinux.h"
#undef bpf_timer
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>

#include "net.bpf.h"
#include "maps.bpf.h"
#include "parse.bpf.h"
#include "csum.bpf.h"
#include "cookie.bpf.h"
#include "tcp.bpf.h"
#include "conn.bpf.h"
#include "http.bpf.h"
#include "answer.bpf.h"
#include "segment.bpf.h"
#include "conn_lock.bpf.h"
#include "sender.bpf.h"
#include "handoff.bpf.h"
#include "coherence.bpf.h"
#include "xdp.bpf.h"

/* Set by user space before load. */
const volatile __u16 server_port = 8080;
/* Report every kernel answer on `events` (for the access log); off, it costs nothing. */
const volatile __u8 log_responses = 0;

/* SYN: answer with a cookie SYN-ACK, or leave it to the kernel. */
static __always_inline int on_syn(struct __sk_buff *skb, struct pkt *p)
{
	struct net_cfg cfg = {};
	struct cookie_opts o = {};
	struct seg g = {};
	struct fs_conn *c;
	__u32 our_mss;

	net_cfg_read(skb, &cfg);
	c = bpf_map_lookup_elem(&conn_track, &p->tuple);
	if (c && c->state != FS_CONN_HANDED_OFF) {
		/* a new connection on a tuple we owned: the old one is over */
		bpf_map_delete_elem(&conn_track, &p->tuple);
		c = NULL;
	}
	/* hand-offs need syncookies; SYN data (TFO) and odd options stay with the kernel */
	if (!cfg.syncookies || p->bad_opts || p->payload_len)
		goto pass;
	/*
	 * A kernel socket on the tuple (TIME_WAIT after user space closed first,
	 * say) decides about the SYN, whether that connection was handed off or
	 * the kernel's from its SYN, which left no entry: a cookie SYN-ACK would
	 * end in a hand-off that meets this socket instead of the listener.
	 */
	if (kernel_holds_tuple(skb, p)) {
		stat_inc(FS_STAT_SYN_HELD);
		goto pass;
	}
	if (c)
		bpf_map_delete_elem(&conn_track, &p->tuple);	/* handed off, socket gone */

	o.mss = p->mss ? p->mss : (p->family == 4 ? 536 : 1220);
	if (p->family == 6 && o.mss < 1220)
		goto pass;
	o.wscale = NO_WSCALE;
	if (p->wscale != NO_WSCALE && cfg.window_scaling)
		o.wscale = p->wscale > TCP_MAX_WSCALE ? TCP_MAX_WSCALE : p->wscale;
	o.sack_ok = p->sack_ok && cfg.sack;
	o.ecn_ok = (p->flags & (TCP_FLAG_ECE | TCP_FLAG_CWR)) == (TCP_FLAG_ECE | TCP_FLAG_CWR) &&
		   cfg.ecn;

	/* the device's MTU, 1280 included (IPv6's minimum); 536 only when unknown */
	our_mss = cfg.mtu > IP_TCP_HDR_MAX ? cfg.mtu - (p->family == 4 ? 40 : 60) : 536;
	if (our_mss > IPV4_MAX_MSS)
		our_mss = IPV4_MAX_MSS;

	g.syn = 1;
	g.seq = cookie_make(&p->tuple, p->seq, &o);
	g.ack = p->seq + 1;
	g.flags = TCP_FLAG_SYN | TCP_FLAG_ACK | (o.ecn_ok ? TCP_FLAG_ECE : 0);
	g.window = OUR_WINDOW;
	g.mss = our_mss;
	g.sack = o.sack_ok;
	g.wscale = o.wscale != NO_WSCALE ? OUR_WSCALE : NO_WSCALE;
	if (p->has_ts && cfg.timestamps) {
		g.ts = 1;
		g.tsval = tcp_now_ms();
		g.tsecr = p->tsval;
	}
	stat_inc(FS_STAT_SYN_ANSWERED);
	return send_bare(skb, p, &g);
pass:
	stat_inc(FS_STAT_SYN_PASSED);
	return TC_ACT_OK;
}

/* Give the connection to the kernel on this request segment. */
static __always_inline int hand_off(struct __sk_buff *skb, struct scratch *s, struct pkt *p,
				    struct fs_conn *c, __u32 reason)
{
	stat_inc(reason);
	report(s, p, FS_EVENT_HANDOFF, reason, 0, 0);
	if (handoff_to_listener(skb, p, c)) {
		/* no listener, or refused: the kernel answers the segment (RST) */
		stat_inc(FS_STAT_HANDOFF_FAILED);
		bpf_map_delete_elem(&conn_track, &p->tuple);
		return TC_ACT_OK;
	}
	c->state = FS_CONN_HANDED_OFF;
	return TC_ACT_OK;
}

/* A segment we do not take: it still carries whatever our answer may send now. */
static __always_inline int drop_or_send(struct __sk_buff *skb, struct fs_conn *c)
{
	stat_inc(FS_STAT_DROPPED);
	if (sender_pending(c))
		return fs_transmit(skb, TX_ACK);
	return TC_ACT_SHOT;
}

/* Counters and the access log for an answer that went out. */
static __always_inline void answered(struct scratch *s, struct pkt *p, struct fs_entry *e,
				     const struct answer *a)
{
	__sync_fetch_and_add(&e->hits, 1);
	stat_inc(FS_STAT_RESPONSES);
	stat_add(FS_STAT_RESPONSE_BYTES, a->payload_len);
	if (a->not_modified)
		stat_inc(FS_STAT_NOT_MODIFIED);
	if (s->http.method == HTTP_HEAD)
		stat_inc(FS_STAT_HEAD_REQUESTS);
	if (log_responses)
		report(s, p, FS_EVENT_RESPONSE, 0, a->not_modified ? 304 : 200, a->body_len);
}

/*
 * An answer longer than one segment or than the client's window: the request's
 * skb carries its first segments (the last of the burst in place, the others as
 * clones); the client's ACKs release the rest.
 */
static __always_inline int answer_segments(struct __sk_buff *skb, struct scratch *s, struct pkt *p,
					   struct fs_conn *c, struct fs_entry *e,
					   const struct answer *a, const struct fs_date *now)
{
	struct sender_work *w = sender_work_get();

	if (!w)
		return TC_ACT_SHOT;
	sender_start(c, e, a, now);
	c->resp_body = e->head_len;	/* the body follows the 200 head */
	if (head_build(w, e, c) < 0) {
		stat_inc(FS_STAT_ERRORS);
		return TC_ACT_SHOT;
	}
	/* how a resend finds this version's head again */
	if (!bpf_map_lookup_elem(&data_paths, &e->data_id))
		bpf_map_update_elem(&data_paths, &e->data_id, &s->key, BPF_ANY);
	if (a->close)
		c->state = FS_CONN_FIN_SENT;
	stat_inc(FS_STAT_MULTI_SEGMENT);
	answered(s, p, e, a);
	return fs_transmit(skb, TX_REQUEST);
}

/* A request at rcv_nxt: answer it from the cache or hand the connection off. */
static __always_inline int on_request(struct __sk_buff *skb, struct pkt *p, struct fs_conn *c)
{
	struct scratch *s = scratch_get();
	const struct fs_date *now;
	struct answer a = {};
	struct seg g = {};
	struct fs_entry *e;
	__u32 reason, len = p->payload_len;

	if (!s)
		return TC_ACT_SHOT;
	/* earlier answers unacknowledged or unsent (pipelining, loss): wait for the
	 * retransmission; a hand-off too waits until everything is acknowledged */
	if (p->ack_seq != c->snd_nxt || seq_before(c->snd_nxt, c->snd_end))
		return drop_or_send(skb, c);
	/* what report() reads when the request is not parsed */
	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->http.method = 0;
	s->http.minor = 0;
	if (p->flags & (TCP_FLAG_FIN | TCP_FLAG_URG) || skb->gso_segs > 1) {
		reason = FS_STAT_HANDOFF_OTHER;
		goto handoff;
	}
	if (len > FS_REQ_MAX) {
		reason = FS_STAT_HANDOFF_REQUEST_SIZE;
		goto handoff;
	}
	if (len == 0 || bpf_skb_load_bytes(skb, p->payload_off, s->req, len)) {
		stat_inc(FS_STAT_ERRORS);
		return TC_ACT_SHOT;
	}
	reason = http_parse(s, len);
	if (reason)
		goto handoff;
	e = bpf_map_lookup_elem(&file_cache, &s->key);
	if (!e) {
		reason = FS_STAT_HANDOFF_MISS;
		goto handoff;
	}
	if (inode_current(e)) {
		reason = FS_STAT_HANDOFF_STALE;
		goto handoff;
	}
	reason = answer_choose(s, &s->http, e, c, &a);
	if (reason)
		goto handoff;
	now = answer_date();
	if (!now) {
		/* no Date written yet (user space is starting): its server answers */
		reason = FS_STAT_HANDOFF_OTHER;
		goto handoff;
	}

	c->req_seq = p->seq;
	c->req_len = len;
	c->rcv_nxt = p->seq + len;
	if (a.segments)
		return answer_segments(skb, s, p, c, e, &a, now);

	conn_seg(c, &g, TCP_FLAG_PSH | (a.close ? TCP_FLAG_FIN : 0));
	if (answer_send(skb, s, p, e, &a, &g, now)) {
		/* the skb is half rewritten: drop it, the client sends the request again */
		c->rcv_nxt = p->seq;
		stat_inc(FS_STAT_ERRORS);
		return TC_ACT_SHOT;
	}
	c->resp_seq = c->snd_nxt;
	c->resp_len = a.payload_len;
	c->snd_nxt += a.payload_len + (a.close ? 1 : 0);
	c->snd_end = c->tx_next = c->snd_nxt;
	sender_one_segment(c);
	if (a.close)
		c->state = FS_CONN_FIN_SENT;
	stat_inc(FS_STAT_SEGMENTS);
	answered(s, p, e, &a);
	return send_back(skb);
handoff:
	return hand_off(skb, s, p, c, reason);
}

/* Acknowledge what we have (a duplicate, a FIN) with a bare segment. */
static __always_inline int send_ack(struct __sk_buff *skb, struct pkt *p, struct fs_conn *c,
				    __u8 flags, __u32 seq)
{
	struct seg g = {};

	conn_seg(c, &g, flags);
	g.seq = seq;
	return send_bare(skb, p, &g);
}

static __always_inline int on_fin(struct __sk_buff *skb, struct pkt *p, struct fs_conn *c)
{
	if (p->seq == c->rcv_nxt && !(c->flags & FS_CONN_F_FIN_RCVD)) {
		stat_inc(FS_STAT_FINS);
		c->rcv_nxt += 1;
		c->flags |= FS_CONN_F_FIN_RCVD;
		if (seq_before(c->tx_next, c->snd_end)) {
			/* still sending an answer: our FIN follows it */
			if (!(c->tx_flags & FS_TX_F_FIN)) {
				c->tx_flags |= FS_TX_F_FIN;
				c->snd_end += 1;
				c->state = FS_CONN_FIN_SENT;
			}
			return fs_transmit(skb, TX_FIN);
		}
		if (c->state == FS_CONN_OPEN) {
			/* the client closes first: our FIN goes with the ACK of its FIN */
			c->state = FS_CONN_FIN_SENT;
			c->snd_nxt += 1;
			c->snd_end = c->tx_next = c->snd_nxt;
			return send_ack(skb, p, c, TCP_FLAG_FIN, c->snd_nxt - 1);
		}
		if (conn_all_acked(c)) {
			stat_inc(FS_STAT_CLOSED);
			bpf_map_delete_elem(&conn_track, &p->tuple);
		}
		return send_ack(skb, p, c, 0, c->snd_nxt);
	}
	if (p->seq + 1 == c->rcv_nxt && (c->flags & FS_CONN_F_FIN_RCVD)) {
		/* our answer to its FIN was lost */
		if (seq_before(c->tx_next, c->snd_end))
			return fs_transmit(skb, TX_FIN);
		if (c->snd_una != c->snd_nxt)
			return send_ack(skb, p, c, TCP_FLAG_FIN, c->snd_nxt - 1);
		return send_ack(skb, p, c, 0, c->snd_nxt);
	}
	return drop_or_send(skb, c);
}

static __always_inline int on_data(struct __sk_buff *skb, struct pkt *p, struct fs_conn *c)
{
	if (p->seq == c->rcv_nxt) {
		/* a request crossing our FIN, which it does not acknowledge: FIN again */
		if (c->state == FS_CONN_FIN_SENT && p->ack_seq + 1 == c->snd_nxt &&
		    !seq_before(c->snd_nxt, c->snd_end))
			return send_ack(skb, p, c, TCP_FLAG_FIN, c->snd_nxt - 1);
		if (c->state != FS_CONN_OPEN || (c->flags & FS_CONN_F_FIN_RCVD))
			return drop_or_send(skb, c);
		return on_request(skb, p, c);
	}
	if (p->seq == c->req_seq && p->payload_len == c->req_len &&
	    c->rcv_nxt == c->req_seq + c->req_len && !(c->flags & FS_CONN_F_FIN_RCVD)) {
		if (p->ack_seq == c->resp_seq && c->snd_una == c->resp_seq) {
			/* our answer never arrived: forget it and take the request anew */
			stat_inc(FS_STAT_RETRANSMITS);
			c->snd_nxt = c->snd_end = c->tx_next = c->resp_seq;
			c->tx_flags &= FS_TX_F_RTT | FS_TX_F_TIMER;
			c->rcv_nxt = c->req_seq;
			c->state = FS_CONN_OPEN;
			return on_request(skb, p, c);
		}
	}
	if (seq_before(p->seq, c->rcv_nxt)) {
		if (sender_pending(c))
			return fs_transmit(skb, TX_FIN);	/* acknowledges it too */
		return send_ack(skb, p, c, 0, c->snd_nxt);	/* old duplicate */
	}
	return drop_or_send(skb, c);				/* a gap: wait for it */
}

/* A segment of a connection we own. */
static __always_inline int on_owned(struct __sk_buff *skb, struct pkt *p, struct fs_conn *c,
				    __u64 now)
{
	__u8 flags = p->flags;

	/* RFC 5681 4.1: after an idle RTO the window starts over */
	if (conn_all_acked(c) && now - c->last_seen_ns > (__u64)c->rto_ms * NSEC_PER_MSEC &&
	    c->cwnd > initial_window(c->seg_size))
		c->cwnd = initial_window(c->seg_size);
	c->last_seen_ns = now;
	if (flags & TCP_FLAG_RST) {
		/* RFC 5961 would ask for an exact match; in-window is enough here */
		if (!seq_before(p->seq, c->rcv_nxt) && seq_before(p->seq, c->rcv_nxt + OUR_WINDOW)) {
			stat_inc(FS_STAT_RSTS);
			bpf_map_delete_elem(&conn_track, &p->tuple);
		}
		return TC_ACT_SHOT;
	}
	if (!(flags & TCP_FLAG_ACK) || seq_after(p->ack_seq, c->snd_nxt)) {
		stat_inc(FS_STAT_DROPPED);
		return TC_ACT_SHOT;
	}
	sender_on_ack(c, p);
	if (p->has_ts && !seq_after(p->seq, c->rcv_nxt))
		c->ts_recent = p->tsval;
	if (p->ip_ecn == IP_ECN_CE)
		c->flags |= FS_CONN_F_ECE;
	if (flags & TCP_FLAG_CWR)
		c->flags &= ~FS_CONN_F_ECE;

	if (p->payload_len)
		return on_data(skb, p, c);
	if (flags & TCP_FLAG_FIN)
		return on_fin(skb, p, c);
	if (c->state == FS_CONN_FIN_SENT && (c->flags & FS_CONN_F_FIN_RCVD) && conn_all_acked(c)) {
		stat_inc(FS_STAT_CLOSED);
		bpf_map_delete_elem(&conn_track, &p->tuple);
		stat_inc(FS_STAT_ACKS);
		return TC_ACT_SHOT;
	}
	stat_inc(FS_STAT_ACKS);
	if (sender_pending(c))
		return fs_transmit(skb, TX_ACK);	/* ACK clocking */
	return TC_ACT_SHOT;
}

/* User space ran us on a dummy packet: the connection's timer fired, the time
 * came for one the kernel had no memory for (the delay in p->seq), or it has
 * been silent with work out for longer than its timer allows (the watchdog). */
static __always_inline int on_kick(struct __sk_buff *skb, struct pkt *p)
{
	struct fs_conn *c = bpf_map_lookup_elem(&conn_track, &p->tuple);
	__u64 now = bpf_ktime_get_ns(), quiet;
	__u32 ms;

	stat_inc(FS_STAT_KICKS);
	if (!c || c->state == FS_CONN_HANDED_OFF)
		return TC_ACT_SHOT;
	if (p->seq && !(c->tx_flags & FS_TX_F_TIMER)) {
		/* the time came for a timer the kernel had no memory for: an expiry if
		 * the client stayed silent, else the timer again for the rest of it
		 * (a test run may find the memory the softirq did not) */
		conn_timer_prepare(c);
		quiet = now - c->last_seen_ns;
		if (sender_due(c)) {
			/* what an earlier expiry marked goes out below */
		} else if (quiet >= (__u64)p->seq * NSEC_PER_MSEC) {
			if (sender_expire(c, &ms)) {
				stat_inc(FS_STAT_KICKS_LATER);
				if (ms)
					conn_timer_start(c, ms);
			}
		} else {
			conn_timer_start(c, p->seq - quiet / NSEC_PER_MSEC);
		}
	} else if (!sender_due(c) && sender_stalled(c, now) && sender_expire(c, &ms)) {
		/* (unsent data that cwnd holds back is no reason to skip the expiry:
		 * nothing else would send it) */
		stat_inc(FS_STAT_WATCHDOG_KICKS);
		if (ms)
			conn_timer_start(c, ms);
	}
	if (!sender_pending(c))
		return TC_ACT_SHOT;
	return fs_transmit(skb, TX_KICK);
}

/*
 * User space closes idle keep-alive connections (fileserver_ctl/keepalive.py):
 * a test run asks whether this one has been silent for p->ack_seq ms with all
 * acknowledged. If so it is marked closing here, under the connection's lock,
 * so that a request answered meanwhile on another CPU cannot be overwritten,
 * and 1 tells user space to send the FIN (sequence number snd_nxt - 1).
 */
static __always_inline int on_idle_close(const struct pkt *p)
{
	struct fs_conn *c = bpf_map_lookup_elem(&conn_track, &p->tuple);
	__u64 now = bpf_ktime_get_ns();

	if (!c || c->state != FS_CONN_OPEN || !conn_all_acked(c) || c->snd_nxt != c->snd_end ||
	    now - c->last_seen_ns < (__u64)p->ack_seq * NSEC_PER_MSEC)
		return 0;
	c->state = FS_CONN_FIN_SENT;
	c->snd_nxt += 1;
	c->last_seen_ns = now;
	return 1;
}

/* A segment that is not a SYN: the connection's state, if it has any, is ours to use. */
static __always_inline int on_segment(struct __sk_buff *skb, struct pkt *p)
{
	__u64 now = bpf_ktime_get_ns();
	struct fs_conn *c;
	int created = 0;

	c = conn_lookup(p, now);
	if (c && c->state == FS_CONN_HANDED_OFF) {
		stat_inc(FS_STAT_PASSED);
		return TC_ACT_OK;
	}
	if (!c) {
		if (p->flags & TCP_FLAG_RST || !(p->flags & TCP_FLAG_ACK))
			return TC_ACT_OK;
		/* a kernel socket's segment (its SYN went to the kernel): one
		 * lookup, cheaper than the cookie's SipHash, and no chance that
		 * its sequence numbers pass for one of our cookies */
		if (kernel_holds_tuple(skb, p)) {
			stat_inc(FS_STAT_PASSED);
			return TC_ACT_OK;
		}
		c = conn_from_cookie(p, now, &created);
		if (!c) {
			/* a kernel socket's segment, or a stale or forged ACK */
			stat_inc(FS_STAT_COOKIE_FAILURES);
			return TC_ACT_OK;
		}
		if (created) {
			sender_init(c, p, skb);
			stat_inc(FS_STAT_HANDSHAKES);
		}
		if (c->state == FS_CONN_HANDED_OFF)
			return TC_ACT_OK;	/* the other CPU's packet handed it off */
	}
	return on_owned(skb, p, c, now);
}

SEC("tc")
int fileserver_ingress(struct __sk_buff *skb)
{
	struct scratch *s = scratch_get();
	struct pkt *p;
	int slot, verdict;

	if (!s)
		return TC_ACT_UNSPEC;
	p = &s->pkt;
	__builtin_memset(p, 0, sizeof(*p));
	/* not our port: let the next filter on this hook (another server's) see it */
	if (parse_packet(skb, p, server_port) != PARSE_OURS)
		return TC_ACT_UNSPEC;
	stat_inc(FS_STAT_PACKETS);

	if ((p->flags & TCP_FLAG_SYN) && skb->mark != FS_KICK_MARK) {
		if (p->flags & (TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN))
			return TC_ACT_OK;
		return on_syn(skb, p);
	}
	/* one CPU at a time on a connection (conn_lock.bpf.h) */
	slot = conn_lock(&p->tuple);
	if (slot < 0)
		return TC_ACT_SHOT;
	if (skb->mark == FS_KICK_MARK && p->seq == SWEEPER_PREPARE)
		verdict = sweeper_prepare();	/* a test run: the verdict is read back */
	else if (skb->mark == FS_KICK_MARK && p->seq == IDLE_CLOSE)
		verdict = on_idle_close(p);	/* ... and so is this one */
	else if (skb->mark == FS_KICK_MARK)
		verdict = on_kick(skb, p);
	else
		verdict = on_segment(skb, p);
	conn_unlock(slot);
	return verdict;
}

/* Every ctime update of an inode (see coherence.bpf.h); user space attaches all three. */
SEC("tp_btf/inode_set_ctime_to_ts")
int BPF_PROG(fileserver_ctime_set, struct inode *inode, struct timespec64 *ts)
{
	forget_inode(inode);
	return 0;
}

SEC("tp_btf/ctime_ns_xchg")
int BPF_PROG(fileserver_ctime_xchg, struct inode *inode, u32 old, u32 new, u32 cur)
{
	forget_inode(inode);
	return 0;
}

SEC("tp_btf/ctime_xchg_skip")
int BPF_PROG(fileserver_ctime_skip, struct inode *inode, struct timespec64 *ctime)
{
	forget_inode(inode);
	return 0;
}

SEC("xdp")
int fileserver_xdp(struct xdp_md *ctx)
{
	return xdp_filter(ctx, server_port);
}

char LICENSE[] SEC("license") = "GPL";
