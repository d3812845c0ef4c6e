/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The TCP sender of answers longer than one segment.
 *
 * Window: at most min(cwnd, the client's window) bytes in flight. cwnd starts
 * at 10 segments (RFC 6928; its 14,600-byte cap is left out, as Linux does,
 * so loopback's 16 KB segments start with 10 too), grows by one segment per
 * ACK of new data in slow start and by one segment per window of bytes
 * acknowledged in congestion avoidance (RFC 5681 3.1's byte counting), only
 * while at least half of it is in use (RFC 7661's idea), and starts over after
 * an idle RTO (RFC 5681 4.1).
 *
 * ACK clocking: every segment of the client runs the program; one that
 * acknowledges new data (or opens the window) releases the next segments: all
 * but the last leave as bpf_clone_redirect clones, the client's own packet,
 * rewritten, carries the last one, so they leave in order. At most
 * FS_BURST_MAX go per packet: on lo and veth they all wait in one CPU's
 * backlog (netdev_max_backlog) until the program returns.
 *
 * Loss (RFC 6675 with what each ACK's SACK blocks say, NewReno's RFC 6582
 * without SACK): a byte is lost when more than two segments are SACKed above
 * it, or any segment once all of the answer is out (no more can come; RFC
 * 5827's idea), or, without SACK, after three duplicate ACKs (fewer for a
 * small flight). Then the window halves (of what was in flight) and fast
 * recovery resends every lost segment as far as what is in flight leaves room
 * in cwnd (RFC 6675's pipe), then new data; a partial ACK resends the next
 * hole; a resend is sent again when data sent after it got there and the hole
 * did not (RACK's idea, RFC 8985). The first two duplicate ACKs each let a new
 * segment out (Limited Transmit, RFC 3042). Nothing of SACK is kept: the
 * blocks of the ACK at hand are the scoreboard.
 *
 * Timer: a bpf_timer in the conn_track value. With data in flight and no loss
 * recovery under way it first waits 2 SRTT + 2 ms for a tail loss probe (RFC
 * 8985: the last segment again, to draw the ACK that starts recovery; see
 * sender_plan for why not new data); in fast recovery the same timeout sends
 * the holes from snd_una again, once per snd_una: a resend lost at the tail
 * of an answer is seen by nothing else short of the RTO (measured, 64 KiB
 * keep-alive over a 2% lossy veth: 529 of 655 RTO expiries were in recovery
 * before, 3,983 req/s; with it 201-208 expiries, 4,947-5,416 req/s). Then an
 * RTO from timestamp RTT samples
 * (RFC 6298 with Linux's 200 ms floor, 1 s without timestamps), doubled per
 * expiry; after FS_RTO_TRIES in a row, a reset. With nothing in flight and the
 * window closed it is the zero-window probe timer. When the kernel has no
 * memory for the timer, user space times the connection (conn_timer_later).
 *
 * One CPU at a time works on a connection (conn_lock.bpf.h): packets, kicks
 * and the timer callback all take its lock.
 *
 * Kicks: a timer callback has no packet to send with. It marks what is due
 * and queues the tuple on `kicks`; user space (fileserver_ctl/retransmit.py)
 * runs the program on a dummy packet of the connection through
 * BPF_PROG_TEST_RUN with skb->mark = FS_KICK_MARK, and the segments leave from
 * there with bpf_clone_redirect (a test run's clones are sent for real). Once
 * a second that thread also kicks connections with work out whose client has
 * been silent far longer than their timer allows; such a kick counts as an
 * expiry (unless one is already due), should a timer or a kick have been lost.
 */
#ifndef __SENDER_BPF_H
#define __SENDER_BPF_H

#include "conn.bpf.h"
#include "conn_lock.bpf.h"
#include "sack.bpf.h"
#include "segment.bpf.h"

#define CLOCK_MONOTONIC	1
#define NSEC_PER_MSEC	1000000ULL
#define EBUSY		16
#define CWND_MAX	0x3fffffff
#define TCP_MSS_DEFAULT	536

enum tx_mode {
	TX_ACK,			/* a client's segment: send what it releases, else drop it */
	TX_FIN,			/* the client's FIN: send what fits, at least an ACK */
	TX_REQUEST,		/* a request: as TX_FIN, and sender_work.head holds the head */
	TX_KICK,		/* a timer kick (test run): every segment leaves as a clone */
};

/*
 * What user space kicks: a conn_track key (struct fs_tuple) whose timer fired,
 * run now; or a struct kick_later, a timer the kernel had no memory for, run
 * after delay_ms with the delay in the dummy packet's sequence number. A kick
 * whose sequence number is SWEEPER_PREPARE starts the sweeper instead.
 */
#define SWEEPER_PREPARE	0xffffffff
/* ... or, with this one, asks whether the connection has been idle for the
 * acknowledgment number's milliseconds (on_idle_close in fileserver.bpf.c) */
#define IDLE_CLOSE	0xfffffffe

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} kicks SEC(".maps");

struct kick_later {
	struct fs_tuple key;
	__u32 delay_ms;
	__u32 pad;
};

/* file version (data_id) being sent -> a request path of it, to find its head again */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FS_DATA_PATHS);
	__type(key, __u64);
	__type(value, struct fs_path_key);
} data_paths SEC(".maps");

/*
 * bpf_skb_change_tail's limit is on the whole frame: FS_SEGMENT_MAX is the
 * payload of an IPv4 one with timestamps; IPv6's header leaves 20 bytes less.
 */
#define SKB_FRAME_MAX (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr) + \
		       TS_OPT_LEN + FS_SEGMENT_MAX)

/* Payload per segment: the client's MSS and our device's MTU, less the options. */
static __always_inline __u32 seg_size_for(struct __sk_buff *skb, const struct fs_conn *c,
					  const struct pkt *p)
{
	__u32 ip_len = p->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u32 opt_len = (c->flags & FS_CONN_F_TSTAMP) ? TS_OPT_LEN : 0;
	__u32 size = c->mss, ours, room;
	struct net_cfg cfg = {};

	net_cfg_read(skb, &cfg);
	ours = cfg.mtu - ip_len - sizeof(struct tcphdr);
	if (cfg.mtu > IP_TCP_HDR_MAX && ours < size)	/* an unknown MTU reads 0 */
		size = ours;
	size -= opt_len;
	room = SKB_FRAME_MAX - sizeof(struct ethhdr) - ip_len - sizeof(struct tcphdr) - opt_len;
	if (size > room)
		size = room;
	/*
	 * A tiny receive window (SO_RCVBUF of a few KiB): at most half of it per
	 * segment, as Linux bounds its own (tcp_bound_to_half_wnd). A full-sized
	 * segment there teaches the client a payload/truesize ratio that leaves it
	 * less than an MSS of window for good: our segments are the client's own
	 * skbs rewritten, a page each after generic XDP, and it never reopens.
	 */
	if (c->snd_wnd > TCP_MSS_DEFAULT && size > c->snd_wnd / 2)
		size = c->snd_wnd / 2;
	return size;
}

/* RFC 6928's 10 segments (as Linux, whatever the segment size) */
static __always_inline __u32 initial_window(__u32 seg)
{
	return FS_IW_SEGMENTS * seg;
}

/* Everything we sent is acknowledged and nothing of the answer is left to send. */
static __always_inline int conn_all_acked(const struct fs_conn *c)
{
	return c->snd_una == c->snd_nxt && !seq_before(c->snd_nxt, c->snd_end);
}

/* Sender fields of a new connection (c is the zeroed value being built). */
static __always_inline void sender_init(struct fs_conn *c, const struct pkt *p,
					struct __sk_buff *skb)
{
	__u32 rtt;

	c->snd_end = c->tx_next = c->resp_seq = c->snd_nxt;
	c->seg_size = seg_size_for(skb, c, p);
	c->cwnd = initial_window(c->seg_size);
	c->ssthresh = CWND_MAX;
	c->ifindex = skb->ifindex;
	__builtin_memcpy(c->mac_client, p->mac_client, ETH_ALEN);
	__builtin_memcpy(c->mac_server, p->mac_server, ETH_ALEN);
	c->rto_ms = FS_RTO_INIT_MS;
	c->recover = c->snd_nxt - 1;	/* RFC 6582: the ISN */
	/* the handshake ACK echoes our SYN-ACK's TSval: the first RTT sample */
	if (p->has_ts && p->tsecr) {
		rtt = tcp_now_ms() - p->tsecr;
		if (rtt < FS_RTO_MAX_MS) {
			c->srtt8 = rtt << 3;
			c->rttvar4 = rtt << 1;
			c->tx_flags |= FS_TX_F_RTT;
			c->rto_ms = rtt + (c->rttvar4 > 1 ? c->rttvar4 : 1);
			if (c->rto_ms < FS_RTO_MIN_MS)
				c->rto_ms = FS_RTO_MIN_MS;
		}
	}
}

static int conn_timer_fired(void *map, struct fs_tuple *key, struct fs_conn *c);

/*
 * Give the connection's timer its memory and callback, the first time it is
 * started (conn_timer_start): most connections only ever get single-segment
 * answers, which need no timer, and a timer's memory is not cheap to give
 * back (measured, 1 KiB `Connection: close`: freeing one per connection took
 * 6% of all CPU time in RCU callbacks and irq_work, the APIC write of which is
 * a VM exit here). The kernel allocates it with kmalloc_nolock(), which only
 * hands out objects already free in its cache (kmalloc-cg-192) and does not
 * grow it, and a freed timer comes back only after an RCU grace period: under
 * churn most inits fail (measured, 64 KiB `Connection: close` on lo: ENOMEM
 * for 191,739 calls, 67,933 timers made). Every later start tries again, and
 * meanwhile the sweeper times the connection (sweeper_add), or user space does
 * (conn_timer_later) if there is no sweeper. A pool of timers made once and
 * reused was measured: 4% more 64 KiB close answers, not adopted, since the
 * same allocator fills the pool only slowly after a cold start.
 */
static __always_inline void conn_timer_prepare(struct fs_conn *c)
{
	long err = bpf_timer_init(&c->rto_timer, &conn_track, CLOCK_MONOTONIC);

	if (err && err != -EBUSY)
		return;		/* no memory now: the next packet tries again */
	if (bpf_timer_set_callback(&c->rto_timer, conn_timer_fired))
		return;
	c->tx_flags |= FS_TX_F_TIMER;
}

/* No timer for the connection of the packet at hand: user space kicks it after ms
 * instead (see kicks; on_kick takes it as an expiry if the client stayed silent). */
static __always_inline void conn_timer_later(__u32 ms)
{
	struct scratch *s = scratch_get();
	struct kick_later *k;

	stat_inc(FS_STAT_KICKS_QUEUED_LATER);
	if (!s)
		return;
	k = bpf_ringbuf_reserve(&kicks, sizeof(*k), 0);
	if (!k)
		return;
	__builtin_memcpy(&k->key, &s->pkt.tuple, sizeof(k->key));
	k->delay_ms = ms;
	k->pad = 0;
	bpf_ringbuf_submit(k, 0);
}

/*
 * Connections without a timer of their own (the kernel had no memory for it)
 * are timed by one timer, the sweeper, that the kernel gave at start: it goes
 * through `timerless` every FS_PTO_MIN_MS and expires the connections whose
 * time came, as their own timer would have. User space has it made through a
 * kick (SWEEPER_PREPARE) at start, while things are quiet, since under load the
 * kernel's allocation fails for it as for any timer (measured: every time on
 * lo at 25,000 new connections a second).
 */
#define TIMERLESS_MAX	4096

/* a connection without a timer of its own -> when its timer would run out (ns) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TIMERLESS_MAX);
	__type(key, struct fs_tuple);
	__type(value, __u64);
} timerless SEC(".maps");

struct sweeper {
	struct bpf_timer timer;
	__u32 ready;			/* initialised, callback set, running */
	__u32 pad;
};

/* [0] -> the sweeper */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sweeper);
} sweepers SEC(".maps");

static int sweeper_fired(void *map, __u32 *key, struct sweeper *sw);

/* Make and start the sweeper if it is not running; 1 when it is. */
static __always_inline int sweeper_prepare(void)
{
	__u32 zero = 0;
	struct sweeper *sw = bpf_map_lookup_elem(&sweepers, &zero);
	long err;

	if (!sw)
		return 0;
	if (sw->ready)
		return 1;
	err = bpf_timer_init(&sw->timer, &sweepers, CLOCK_MONOTONIC);
	if ((err && err != -EBUSY) || bpf_timer_set_callback(&sw->timer, sweeper_fired) ||
	    bpf_timer_start(&sw->timer, FS_PTO_MIN_MS * NSEC_PER_MSEC, 0))
		return 0;
	sw->ready = 1;
	return 1;
}

/* Time the connection of the packet at hand with the sweeper; 0 when it is on the list. */
static __always_inline int sweeper_add(__u32 ms)
{
	struct scratch *s = scratch_get();
	__u32 zero = 0;
	struct sweeper *sw = bpf_map_lookup_elem(&sweepers, &zero);
	__u64 due = bpf_ktime_get_ns() + (__u64)ms * NSEC_PER_MSEC;

	if (!s || !sw || !sw->ready)
		return -1;
	return bpf_map_update_elem(&timerless, &s->pkt.tuple, &due, BPF_ANY) ? -1 : 0;
}

/* (Re)start the connection's timer, made here the first time; a value user
 * space rewrote has lost it. */
static __always_inline void conn_timer_start(struct fs_conn *c, __u32 ms)
{
	__u64 ns = (__u64)ms * NSEC_PER_MSEC;

	if (bpf_timer_start(&c->rto_timer, ns, 0) == 0)
		return;
	c->tx_flags &= ~FS_TX_F_TIMER;
	conn_timer_prepare(c);
	if (bpf_timer_start(&c->rto_timer, ns, 0) == 0)
		return;
	stat_inc(FS_STAT_TIMER_FAILURES);
	if (sweeper_add(ms))
		conn_timer_later(ms);	/* no sweeper (yet): user space times it */
}

/*
 * The timer for what is in flight: the probe timeout while no probe went out
 * since snd_una last moved and no RTO recovery is under way
 * (RFC 8985 7.2, as Linux: 2 * SRTT + 2 ms, + the delayed ACK with one segment
 * out), else the RTO. The floor, FS_PTO_MIN_MS: SRTT comes in whole ms, and a
 * timer due before the next tick (4 ms at HZ 250) makes every start reprogram
 * the clock event device, a VM exit here. Measured, 64 KiB answers: on lo a 3
 * ms floor took ~15% more program time per answer than 5 or 10 ms; over a 2%
 * lossy veth 5 ms gave 4,064-4,089 answers/s, 10 ms 3,666-3,825.
 */
static __always_inline void conn_timer_restart(struct fs_conn *c)
{
	__u32 flight = c->snd_nxt - c->snd_una, pto;

	if (!flight || (c->tx_flags & (FS_TX_F_TLP_DONE | FS_TX_F_LOSS)) ||
	    !(c->tx_flags & FS_TX_F_RTT)) {
		conn_timer_start(c, c->rto_ms);
		return;
	}
	pto = (c->srtt8 >> 2) + FS_PTO_EXTRA_MS + (flight <= c->seg_size ? FS_ACK_DELAY_MS : 0);
	if (pto < FS_PTO_MIN_MS)
		pto = FS_PTO_MIN_MS;
	conn_timer_start(c, pto < c->rto_ms ? pto : c->rto_ms);
}

/* RFC 6298 2.2/2.3 with the usual scaled integers; rtt in ms. */
static __always_inline void rtt_sample(struct fs_conn *c, __u32 rtt)
{
	__s32 delta;
	__u32 rto;

	if (!(c->tx_flags & FS_TX_F_RTT)) {
		c->srtt8 = rtt << 3;
		c->rttvar4 = rtt << 1;
		c->tx_flags |= FS_TX_F_RTT;
	} else {
		delta = (__s32)rtt - (__s32)(c->srtt8 >> 3);
		c->srtt8 += delta;
		if (delta < 0)
			delta = -delta;
		c->rttvar4 += delta - (c->rttvar4 >> 2);
	}
	rto = (c->srtt8 >> 3) + (c->rttvar4 > 1 ? c->rttvar4 : 1);
	if (rto < FS_RTO_MIN_MS)
		rto = FS_RTO_MIN_MS;
	if (rto > FS_RTO_MAX_MS)
		rto = FS_RTO_MAX_MS;
	c->rto_ms = rto;
}

/* An answer longer than one segment (or the window) starts at snd_nxt. */
static __always_inline void sender_start(struct fs_conn *c, const struct fs_entry *e,
					 const struct answer *a, const struct fs_date *now)
{
	c->resp_seq = c->snd_nxt;
	c->resp_len = a->payload_len;
	c->resp_head = a->head_len + (a->close ? CLOSE_EXTRA : 0);
	c->resp_variant = a->variant;
	c->data_id = e->data_id;
	c->tail0 = stream_class0(e->head_len + e->body_len);
	c->tx_next = c->snd_nxt;
	c->snd_end = c->snd_nxt + a->payload_len + a->close;
	c->tx_flags &= FS_TX_F_RTT | FS_TX_F_TIMER;
	if (a->close)
		c->tx_flags |= FS_TX_F_FIN;
	c->dupacks = 0;
	c->retries = 0;
	__builtin_memcpy(c->date, now->value, FS_DATE_SLOT);
}

/* An answer sent whole in place of its request: none of the sender's state
 * describes it, so nothing may be made again from that state. */
static __always_inline void sender_one_segment(struct fs_conn *c)
{
	c->tx_flags &= FS_TX_F_RTT | FS_TX_F_TIMER;
	c->tx_flags |= FS_TX_F_ONE;
	c->dupacks = 0;
	c->retries = 0;
}

/* An expiry marked something due that has not gone out yet. */
static __always_inline int sender_due(const struct fs_conn *c)
{
	return c->tx_flags & (FS_TX_F_RESEND | FS_TX_F_PROBE | FS_TX_F_RESET | FS_TX_F_TLP_DUE);
}

/* Anything to send: a resend, a probe, a reset, or unsent data of the answer. */
static __always_inline int sender_pending(const struct fs_conn *c)
{
	if (c->tx_flags & FS_TX_F_ONE)
		return 0;
	return sender_due(c) || seq_before(c->tx_next, c->snd_end);
}

/* One planned segment: sequence number, payload length, TX_SEG_* flags. */
static __always_inline void plan_add(struct sender_work *w, __u32 seq, __u32 len, __u8 flags)
{
	__u32 n = w->n;

	if (n > FS_BURST_MAX)
		return;
	w->seq[n] = seq;
	w->len[n] = len;
	w->flags[n] = flags;
	w->n = n + 1;
}

/*
 * Bytes from seq to the end of its segment. Segments are counted back from the
 * end of the answer, so the short one is the first: a clone shares its data, so
 * rewriting the skb after a clone copies it whole, and the short one is the
 * cheap one to copy. The grid never moves, so a resend is the same segment.
 */
static __always_inline __u32 seg_len_at(const struct fs_conn *c, __u32 seq)
{
	__u32 off = seq - c->resp_seq, len = c->resp_len, size = c->seg_size, first;

	if (off >= len || !size)
		return 0;
	first = len % size;
	if (off < first)
		return first - off;
	return size - (off - first) % size;
}

/* Where the segment holding seq starts (seq inside the answer). */
static __always_inline __u32 seg_start_at(const struct fs_conn *c, __u32 seq)
{
	__u32 off = seq - c->resp_seq, size = c->seg_size, first;

	if (!size)
		return seq;
	first = c->resp_len % size;
	if (off < first)
		return c->resp_seq;
	return c->resp_seq + first + (off - first) / size * size;
}

static __always_inline __u8 seg_flags_at(const struct fs_conn *c, __u32 seq, __u32 len)
{
	__u32 data_end = c->resp_seq + c->resp_len;

	if (seq + len != data_end)
		return 0;
	return (len ? TX_SEG_PSH : 0) | ((c->tx_flags & FS_TX_F_FIN) ? TX_SEG_FIN : 0);
}

/* A walk that plans segments, one per bpf_loop step (the verifier checks a step once). */
struct plan_walk {
	__u32 seq;			/* where the walk is */
	__u32 lost_end;			/* resends: what no block holds below this is lost */
	__u32 budget;			/* resends: bytes the congestion window still takes */
	__u32 wnd_end;			/* nothing ends past this */
	__u8 force;			/* one resend goes whatever the budget (FS_TX_F_RESEND) */
	__u8 stalled;			/* the client's window stopped new data */
};

/* This CPU's planning state, kept off the 512-byte stack: the callbacks of a
 * walk find it here and the connection through the pointer they are passed. */
struct tx_plan {
	struct sack_view view;		/* of the ACK at hand */
	struct plan_walk walk;
};

/* [0] -> this CPU's struct tx_plan */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tx_plan);
} tx_plan SEC(".maps");

static __always_inline struct tx_plan *tx_plan_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&tx_plan, &zero);
}

/* This CPU's view of p's blocks against the sequence numbers the caller put
 * there: a function of its own, verified once for its callers and with its own
 * stack frame. */
__noinline int fs_sack_view(const struct pkt *p)
{
	struct tx_plan *t = tx_plan_get();

	if (!t || !p)
		return -1;
	sack_fill(&t->view, p);
	return 0;
}

/* The sequence numbers a view is made against: c's as they are now. */
static __always_inline void sack_view_base(struct sack_view *v, const struct fs_conn *c)
{
	v->snd_una = c->snd_una;
	v->snd_nxt = c->snd_nxt;
	v->snd_end = c->snd_end;
	v->seg = c->seg_size;
	v->dupacks = c->dupacks;
}

/*
 * The view sender_on_ack made of the packet at hand, brought up to date with c
 * (a request since may have started an answer); a kick's packet has no ACK of
 * its own, so no blocks. NULL only if the map is missing.
 */
static __always_inline struct sack_view *sack_view_again(const struct fs_conn *c, int blocks)
{
	struct tx_plan *t = tx_plan_get();
	struct sack_view *v;
	__u32 k;

	if (!t)
		return NULL;
	v = &t->view;
	sack_view_base(v, c);
	if (!blocks) {
#pragma unroll
		for (k = 0; k < 4; k++)
			v->start[k] = v->end[k] = c->snd_una;
		v->n = 0;
		v->sacked = 0;
		v->high = c->snd_una;
	}
	v->lost_end = sack_lost_end(v);
	return v;
}

/* The view of the ACK at hand for c (sender_on_ack); NULL only if the map is missing. */
static __always_inline struct sack_view *sack_view_get(const struct fs_conn *c,
						       const struct pkt *p)
{
	struct tx_plan *t;

	if (!p->sack_count)
		return sack_view_again(c, 0);	/* the common case, without a call */
	t = tx_plan_get();
	if (!t)
		return NULL;
	sack_view_base(&t->view, c);
	return fs_sack_view(p) ? NULL : &t->view;
}

/*
 * Enough is lost at snd_una (above): enter fast recovery. The window halves
 * (RFC 5681 (4): half of what was in flight when the client sent this ACK,
 * before it acknowledged part of it), the first hole goes out now, and from
 * then on what is in flight (RFC 6675's pipe, sender_plan) decides what the
 * window takes.
 * RFC 6582 4.1 wants ack > recover, so that duplicates of a timeout's resends
 * start no recovery; SACK blocks above ack show new data got through past a
 * hole (a duplicate only makes a D-SACK).
 */
static __always_inline void sender_loss_check(struct fs_conn *c, const struct sack_view *v,
					      __u32 flight)
{
	__u32 seg = c->seg_size;

	if (!seq_after(v->lost_end, c->snd_una))
		return;
	if (!seq_after(c->snd_una, c->recover) && !v->n)
		return;
	c->ssthresh = flight / 2 > 2 * seg ? flight / 2 : 2 * seg;
	c->cwnd = c->ssthresh;
	c->recover = c->snd_nxt;
	c->tx_next = c->snd_una;	/* in recovery: the next byte to resend */
	c->tx_flags |= FS_TX_F_RECOVERY | FS_TX_F_RESEND;
}

/*
 * What an ACK tells the sender (RFC 5681, 6582, 6675, 6298). Runs for every
 * segment of the client that carries an acceptable ACK, before its payload or
 * FIN.
 */
static __always_inline void sender_on_ack(struct fs_conn *c, const struct pkt *p)
{
	__u32 ack = p->ack_seq, wnd = (__u32)p->window << c->snd_wscale;
	__u32 seg = c->seg_size, acked, flight = c->snd_nxt - c->snd_una, old_wnd;
	int advanced = seq_after(ack, c->snd_una);
	struct sack_view *v;

	if (advanced) {
		acked = ack - c->snd_una;
		c->snd_una = ack;
		if (seq_after(ack, c->tx_next))
			c->tx_next = ack;	/* it had more than we resent so far */
		c->retries = 0;
		c->dupacks = 0;
		/* progress: no probe is needed now, and a new one may go later */
		c->tx_flags &= ~(FS_TX_F_TLP_DONE | FS_TX_F_TLP_DUE);
		if (p->has_ts && p->tsecr && (c->flags & FS_CONN_F_TSTAMP)) {
			__u32 rtt = tcp_now_ms() - p->tsecr;

			if (rtt < FS_RTO_MAX_MS)
				rtt_sample(c, rtt);
		}
		if (c->tx_flags & FS_TX_F_RECOVERY) {
			if (!seq_before(ack, c->recover)) {
				/* full ACK: leave fast recovery with the halved window */
				c->tx_flags &= ~(FS_TX_F_RECOVERY | FS_TX_F_RESEND);
				c->cwnd = c->ssthresh;
				c->tx_next = c->snd_nxt;
			} else if (c->tx_next == ack) {
				/* partial ACK, and the next hole not resent yet (RFC 6582 3.2 5) */
				c->tx_flags |= FS_TX_F_RESEND;
			}
		} else if (flight * 2 >= c->cwnd && c->cwnd < CWND_MAX) {
			if (c->cwnd < c->ssthresh)
				c->cwnd += acked < seg ? acked : seg;
			else	/* a segment per window acknowledged, in bytes (RFC 5681 3.1) */
				c->cwnd += (seg * acked) / c->cwnd ? (seg * acked) / c->cwnd : 1;
		}
		if (c->tx_flags & FS_TX_F_LOSS && !seq_before(c->tx_next, c->snd_nxt))
			c->tx_flags &= ~FS_TX_F_LOSS;
		/* RFC 6298 5.3: restart the timer while data is in flight */
		if (c->snd_una != c->snd_nxt)
			conn_timer_restart(c);
	}
	/* nothing in flight: an answer to a probe, and the client is there */
	if (!flight)
		c->retries = 0;
	old_wnd = c->snd_wnd;
	c->snd_wnd = wnd;
	v = sack_view_get(c, p);
	if (!v)
		return;
	if (!advanced && ack == c->snd_una && c->snd_una != c->snd_nxt && !p->payload_len &&
	    !(p->flags & (TCP_FLAG_FIN | TCP_FLAG_SYN)) && (v->n || (wnd == old_wnd && !p->has_sack))) {
		/* a duplicate ACK (RFC 5681 2; new SACK blocks: Linux grows its window meanwhile) */
		if (c->dupacks < 255)
			c->dupacks++;
		v->dupacks = c->dupacks;	/* what the view counts without blocks */
		v->lost_end = sack_lost_end(v);
	}
	if ((c->tx_flags & FS_TX_F_RECOVERY) && v->n && seq_before(c->snd_una, c->tx_next) &&
	    seq_after(v->high, c->resent_nxt)) {
		/* what was sent after our last resend arrived, the hole at snd_una did
		 * not: that resend was lost too (RACK's idea, RFC 8985); the holes go again */
		c->tx_next = c->snd_una;
		c->tx_flags |= FS_TX_F_RESEND;
	}
	if (c->snd_una != c->snd_nxt && !(c->tx_flags & (FS_TX_F_RECOVERY | FS_TX_F_LOSS)) && seg)
		sender_loss_check(c, v, flight);
}

/* Resend the next lost segment from pw->seq, SACKed ranges skipped (RFC 6675 NextSeg (1)). */
static long plan_resend(__u64 i, void *ctx)
{
	const struct fs_conn *c = *(const struct fs_conn **)ctx;
	struct sender_work *w = sender_work_get();
	struct tx_plan *t = tx_plan_get();
	struct plan_walk *pw;
	__u32 seq, len, end;
	__u8 flags;

	if (!t || !w)
		return 1;
	pw = &t->walk;
	seq = sack_skip(&t->view, pw->seq);
	pw->seq = seq;
	if (!seq_before(seq, c->snd_nxt))
		return 1;
	if (!pw->force && !seq_before(seq, pw->lost_end))
		return 1;
	len = seg_len_at(c, seq);
	end = sack_next(&t->view, seq, seq + len);
	len = end - seq;
	flags = seg_flags_at(c, seq, len);
	if (!len && !(flags & TX_SEG_FIN))
		return 1;
	if (!pw->force && (len > pw->budget || seq_after(end, pw->wnd_end)))
		return 1;
	pw->budget = pw->budget > len ? pw->budget - len : 0;
	pw->force = 0;
	plan_add(w, seq, len, flags);
	pw->seq = end + ((flags & TX_SEG_FIN) ? 1 : 0);
	return w->n > FS_BURST_MAX;
}

/* Send new data from pw->seq while it ends within pw->wnd_end. */
static long plan_new(__u64 i, void *ctx)
{
	const struct fs_conn *c = *(const struct fs_conn **)ctx;
	struct sender_work *w = sender_work_get();
	struct tx_plan *t = tx_plan_get();
	struct plan_walk *pw;
	__u32 seq, len;
	__u8 flags;

	if (!t || !w)
		return 1;
	pw = &t->walk;
	seq = pw->seq;

	if (!seq_before(seq, c->snd_end))
		return 1;
	len = seg_len_at(c, seq);
	if (seq_after(seq + len, pw->wnd_end)) {
		pw->stalled = seq_after(seq + len, c->snd_una + c->snd_wnd);
		/* nothing in flight and the client's window is what stops us:
		 * send what it takes (the client keeps any window it offers) */
		if (seq != c->snd_una || !seq_before(seq, pw->wnd_end) || c->snd_wnd >= c->cwnd)
			return 1;
		len = pw->wnd_end - seq;
	}
	flags = seg_flags_at(c, seq, len);
	plan_add(w, seq, len, flags);
	pw->seq = seq + len + ((flags & TX_SEG_FIN) ? 1 : 0);
	return w->n > FS_BURST_MAX;
}

/*
 * Plan what to send now into w: a reset or a probe when the timer asked for
 * one; in loss recovery the lost segments, then new data, as far as what is
 * in flight leaves room in cwnd (RFC 6675's pipe: out, less what the ACK at
 * hand SACKs - or one segment per duplicate ACK without SACK - less what is
 * lost and not resent yet; after a timeout everything not SACKed is lost);
 * else new data within min(cwnd, the client's window). Returns 1 when the
 * client's window stopped it.
 */
static __always_inline int sender_plan(const struct fs_conn *c, struct sender_work *w, __u32 mode)
{
	struct tx_plan *t = tx_plan_get();
	__u32 cwnd = c->cwnd, len, last, flight, sacked, pipe, from, rwnd_end;
	struct plan_walk *pw;
	struct sack_view *v;

	w->n = 0;
	if (!t)
		return 0;
	if (c->tx_flags & FS_TX_F_RESET) {
		plan_add(w, c->snd_nxt, 0, TX_SEG_RST);
		return 0;
	}
	if ((c->tx_flags & FS_TX_F_PROBE) && c->snd_wnd == 0) {
		/* an old sequence number: the client answers with its window */
		plan_add(w, c->snd_una - 1, 0, 0);
		return 0;
	}
	if ((c->tx_flags & FS_TX_F_TLP_DUE) && seq_before(c->snd_una, c->snd_nxt)) {
		/* the last segment sent again, not new data (RFC 8985 7.3's SHOULD): the
		 * client acknowledges a duplicate at once, while it may hold new data
		 * under its delayed ACK (measured: Linux clients held 4-5 segments for
		 * 40 ms); it puts nothing new in flight either */
		last = c->snd_nxt - 1;
		if (seq_after(c->snd_nxt, c->resp_seq + c->resp_len) &&
		    seq_before(c->snd_una, c->resp_seq + c->resp_len))
			last = c->resp_seq + c->resp_len - 1;	/* the data our FIN came with */
		last = seg_start_at(c, last);
		len = seg_len_at(c, last);
		if (seq_after(last + len, c->snd_nxt))
			len = c->snd_nxt - last;
		plan_add(w, last, len, seg_flags_at(c, last, len));
		return 0;
	}
	pw = &t->walk;
	pw->stalled = 0;
	rwnd_end = c->snd_una + c->snd_wnd;
	if (c->tx_flags & (FS_TX_F_RECOVERY | FS_TX_F_LOSS)) {
		v = sack_view_again(c, mode != TX_KICK);
		if (!v)
			return 0;
		flight = c->snd_nxt - c->snd_una;
		from = seq_after(c->tx_next, c->snd_una) ? c->tx_next : c->snd_una;
		pw->lost_end = (c->tx_flags & FS_TX_F_LOSS) ? c->snd_nxt : v->lost_end;
		sacked = v->n ? v->sacked : c->dupacks * c->seg_size;
		pipe = flight > sacked ? flight - sacked : 0;
		if (seq_after(pw->lost_end, from)) {
			len = pw->lost_end - from - sack_between(v, from, pw->lost_end);
			pipe = pipe > len ? pipe - len : 0;
		}
		pw->budget = cwnd > pipe ? cwnd - pipe : 0;
		pw->seq = from;
		pw->wnd_end = rwnd_end;
		pw->force = !!(c->tx_flags & FS_TX_F_RESEND);
		bpf_loop(FS_BURST_MAX + 1, plan_resend, &c, 0);
		/* RFC 6675 NextSeg (2): new data in what is left */
		pw->seq = c->snd_nxt;
		pw->wnd_end = c->snd_nxt + pw->budget;
		if (seq_after(pw->wnd_end, rwnd_end))
			pw->wnd_end = rwnd_end;
		bpf_loop(FS_BURST_MAX + 1, plan_new, &c, 0);
		return pw->stalled;
	}
	/* RFC 3042: the first two duplicate ACKs each let one more segment out */
	if (c->dupacks && c->dupacks < 3)
		cwnd += c->dupacks * c->seg_size;
	pw->wnd_end = c->snd_una + (cwnd < c->snd_wnd ? cwnd : c->snd_wnd);
	if ((c->tx_flags & FS_TX_F_RESEND) && seq_before(c->snd_una, c->snd_nxt)) {
		len = seg_len_at(c, c->snd_una);
		plan_add(w, c->snd_una, len, seg_flags_at(c, c->snd_una, len));
	}
	pw->seq = c->tx_next;
	bpf_loop(FS_BURST_MAX + 1, plan_new, &c, 0);
	return pw->stalled;
}

/* sender_plan for the connection of the packet at hand, in a frame of its own
 * (the call chain of fs_transmit stays within the 512-byte stack): 1 when the
 * client's window stopped it, -1 when there is no such connection. */
__noinline int fs_plan(__u32 mode)
{
	struct scratch *s = scratch_get();
	struct sender_work *w = sender_work_get();
	struct fs_conn *c;

	if (!s || !w)
		return -1;
	c = bpf_map_lookup_elem(&conn_track, &s->pkt.tuple);
	if (!c)
		return -1;
	return sender_plan(c, w, mode);
}

/* The answer's head again for a resend: its path from data_paths, then its entry. */
static __always_inline int head_reload(struct sender_work *w, const struct fs_conn *c)
{
	struct fs_path_key *path = bpf_map_lookup_elem(&data_paths, &c->data_id);
	struct fs_entry *e;

	if (!path)
		return -1;
	e = bpf_map_lookup_elem(&file_cache, path);
	if (!e || e->data_id != c->data_id)
		return -1;	/* the file changed since: this answer cannot be made again */
	return head_build(w, e, c) < 0 ? -1 : 0;
}

/* The version the answer is made from is still cached: the cache may drop a
 * version's chunks when it installs another (cache.py), and then no segment of the
 * answer can be made again. */
static __always_inline int version_present(const struct fs_conn *c)
{
	return stream_chunk0_present(c->data_id, c->tail0);
}

/* The plan sends answer bytes (not only flags). */
static __always_inline int plan_has_payload(const struct sender_work *w)
{
	__u32 i;

	for (i = 0; i < FS_BURST_MAX + 1; i++) {
		if (i >= w->n)
			break;
		if (w->len[i])
			return 1;
	}
	return 0;
}

/* The plan touches the head of the answer. */
static __always_inline int plan_needs_head(const struct sender_work *w, const struct fs_conn *c)
{
	__u32 i;

	for (i = 0; i < FS_BURST_MAX + 1; i++) {
		if (i >= w->n)
			break;
		if (w->len[i] && seq_before(w->seq[i], c->resp_seq + c->resp_head))
			return 1;
	}
	return 0;
}

/* bpf_loop state of sender_commit */
struct commit_walk {
	struct fs_conn *c;
	const struct sender_work *w;
	__u32 resent;
	__u32 resent_nxt;		/* snd_nxt as the last resend went out */
};

/* Planned segment i went out: counters, tx_next and snd_nxt. */
static long commit_step(__u64 i, void *ctx)
{
	struct commit_walk *cw = ctx;
	const struct sender_work *w = cw->w;
	struct fs_conn *c = cw->c;
	__u32 k = i, seq, end;
	int rxt;

	if (k >= w->n || k > FS_BURST_MAX)
		return 1;
	seq = w->seq[k];
	end = seq + w->len[k] + ((w->flags[k] & TX_SEG_FIN) ? 1 : 0);
	if (w->flags[k] & TX_SEG_RST)
		return 0;
	if (w->len[k])
		stat_inc(FS_STAT_SEGMENTS);
	if (end == seq)
		return 0;
	rxt = seq_before(seq, c->snd_nxt);
	if (rxt) {
		cw->resent = 1;
		cw->resent_nxt = c->snd_nxt;	/* resends go first: new data follows them */
		if (!(c->tx_flags & FS_TX_F_TLP_DUE))
			stat_inc(c->tx_flags & FS_TX_F_LOSS ? FS_STAT_RETRANSMIT_TIMEOUT :
							       FS_STAT_RETRANSMIT_FAST);
	}
	/* in fast recovery tx_next is the next byte to resend: new data and a
	 * probe's resend of the last segment leave it */
	if (!(c->tx_flags & FS_TX_F_RECOVERY) || (rxt && !(c->tx_flags & FS_TX_F_TLP_DUE)))
		if (!seq_before(seq, c->tx_next) && seq_after(end, c->tx_next))
			c->tx_next = end;
	if (seq_after(end, c->snd_nxt))
		c->snd_nxt = end;
	return 0;
}

/* After the plan went out: sequence numbers, counters, flags, the timer. */
static __always_inline void sender_commit(struct fs_conn *c, const struct sender_work *w)
{
	struct commit_walk cw = { .c = c, .w = w };
	int idle = c->snd_una == c->snd_nxt;

	bpf_loop(FS_BURST_MAX + 1, commit_step, &cw, 0);
	if (c->tx_flags & FS_TX_F_TLP_DUE)
		stat_inc(FS_STAT_TAIL_PROBES);
	if (cw.resent)
		c->resent_nxt = cw.resent_nxt;
	c->tx_flags &= ~(FS_TX_F_RESEND | FS_TX_F_PROBE | FS_TX_F_TLP_DUE);
	if (c->tx_flags & FS_TX_F_LOSS && !seq_before(c->tx_next, c->snd_nxt))
		c->tx_flags &= ~FS_TX_F_LOSS;
	/* RFC 6298 5.1: the timer runs while data is in flight; with nothing in
	 * flight and data left, it is the zero-window probe timer */
	if ((idle || cw.resent) && (c->snd_una != c->snd_nxt || seq_before(c->tx_next, c->snd_end)))
		conn_timer_restart(c);
}

/*
 * Send what fs_plan planned for the connection of the packet at hand (scratch
 * pkt), in place of that packet and as clones of it. Returns the TC verdict.
 */
__noinline int fs_send(struct __sk_buff *skb, __u32 mode)
{
	struct scratch *s = scratch_get();
	struct sender_work *w = sender_work_get();
	struct fs_conn *c;
	__u32 i, n, ifindex;
	int reset;

	if (!s || !w)
		return TC_ACT_SHOT;
	ifindex = skb->ifindex;
	barrier_var(ifindex);	/* a ctx load of its own, not a select of pointers */
	c = bpf_map_lookup_elem(&conn_track, &s->pkt.tuple);
	if (!c)
		return TC_ACT_SHOT;
	if (w->n == 0) {
		if (mode == TX_ACK || mode == TX_KICK) {
			if (seq_before(c->tx_next, c->snd_end) && c->snd_una == c->snd_nxt)
				conn_timer_start(c, c->rto_ms);	/* window closed: probe later */
			return TC_ACT_SHOT;
		}
		plan_add(w, c->snd_nxt, 0, 0);	/* at least acknowledge what came */
	}
	reset = c->tx_flags & FS_TX_F_RESET;
	if (mode != TX_REQUEST)
		w->head_ok = 0;	/* a request just built it; anything else makes it again */
	if (!reset && mode != TX_REQUEST && plan_has_payload(w) &&
	    ((!w->head_ok && plan_needs_head(w, c) && head_reload(w, c)) || !version_present(c))) {
		/* what the answer is made of is gone: end the connection now rather than
		 * fail at every resend until the timeouts run out */
		stat_inc(FS_STAT_VERSION_GONE);
		c->tx_flags |= FS_TX_F_RESET;
		w->n = 0;
		plan_add(w, c->snd_nxt, 0, TX_SEG_RST);
	}

	__builtin_memset(&w->seg, 0, sizeof(w->seg));
	conn_seg(c, &w->seg, 0);
	w->base_flags = w->seg.flags;
	w->seg.partial = skb_csum_partial(skb);
	w->data_id = c->data_id;
	w->resp_seq = c->resp_seq;
	w->resp_len = c->resp_len;
	w->resp_head = c->resp_head;
	w->body_off = c->resp_body;
	if (mode == TX_KICK) {
		/* a test run's packet: addresses from the kick, devices from the connection */
		__builtin_memcpy(s->pkt.mac_client, c->mac_client, ETH_ALEN);
		__builtin_memcpy(s->pkt.mac_server, c->mac_server, ETH_ALEN);
		ifindex = c->ifindex;
	}

	n = w->n;
	for (i = 0; i < FS_BURST_MAX + 1; i++) {
		if (i >= n)
			break;
		if (fs_emit_segment(skb, i)) {
			stat_inc(FS_STAT_ERRORS);
			return TC_ACT_SHOT;
		}
		/* > 0: the device dropped it, a loss like any other */
		if ((i + 1 < n || mode == TX_KICK) && bpf_clone_redirect(skb, ifindex, 0) < 0) {
			stat_inc(FS_STAT_ERRORS);
			return TC_ACT_SHOT;
		}
	}
	if (c->tx_flags & FS_TX_F_RESET) {
		if (reset)
			stat_inc(FS_STAT_RTO_RESETS);
		bpf_map_delete_elem(&conn_track, &s->pkt.tuple);
	} else {
		if (c->tx_flags & FS_TX_F_PROBE && c->snd_wnd == 0)
			stat_inc(FS_STAT_WINDOW_PROBES);
		sender_commit(c, w);
	}
	if (mode == TX_KICK)
		return TC_ACT_SHOT;
	return bpf_redirect(ifindex, 0);
}

/* Plan, then send (two functions, so that neither call chain outgrows the stack). */
static __always_inline int fs_transmit(struct __sk_buff *skb, __u32 mode)
{
	int stalled = fs_plan(mode);

	if (stalled < 0)
		return TC_ACT_SHOT;
	if (stalled)
		stat_inc(FS_STAT_WINDOW_STALLS);
	return fs_send(skb, mode);
}

/*
 * The timer expired (or the watchdog found the connection silent with work
 * out): mark what is due - a tail loss probe, a resend from snd_una after a
 * timeout, a zero-window probe, a reset. Returns 0 when nothing is; else
 * *rearm_ms is when the timer should fire next (0: not again).
 */
static __always_inline int sender_expire(struct fs_conn *c, __u32 *rearm_ms)
{
	__u32 flight = c->snd_nxt - c->snd_una, seg = c->seg_size;

	*rearm_ms = 0;
	if (c->state == FS_CONN_HANDED_OFF || conn_all_acked(c) || (c->tx_flags & FS_TX_F_ONE))
		return 0;
	if (!flight && !seq_before(c->tx_next, c->snd_end))
		return 0;
	/* only a FIN the answer did not end with (the client closed first, the
	 * idle close): the client sends its FIN again if ours is lost */
	if (!seq_before(c->snd_una, c->resp_seq + c->resp_len) &&
	    !seq_before(c->tx_next, c->snd_end) && !(c->tx_flags & FS_TX_F_FIN))
		return 0;
	if (flight && !(c->tx_flags & (FS_TX_F_TLP_DONE | FS_TX_F_RECOVERY | FS_TX_F_LOSS)) &&
	    (c->tx_flags & FS_TX_F_RTT)) {
		/* the probe timeout: a tail loss probe, then the RTO proper */
		c->tx_flags |= FS_TX_F_TLP_DUE | FS_TX_F_TLP_DONE;
		*rearm_ms = c->rto_ms;
		return 1;
	}
	if (flight && (c->tx_flags & FS_TX_F_RECOVERY) && !(c->tx_flags & FS_TX_F_TLP_DONE) &&
	    (c->tx_flags & FS_TX_F_RTT)) {
		/* recovery went quiet: a resend at the tail of the answer was lost,
		 * which nothing sent after it can show (the RACK rule in
		 * sender_on_ack); the holes go again, once per snd_una */
		c->tx_next = c->snd_una;
		c->tx_flags |= FS_TX_F_RESEND | FS_TX_F_TLP_DONE;
		stat_inc(FS_STAT_RECOVERY_PROBES);
		*rearm_ms = c->rto_ms;
		return 1;
	}
	if (++c->retries > FS_RTO_TRIES) {
		c->tx_flags |= FS_TX_F_RESET;
	} else if (flight) {
		stat_inc(FS_STAT_RTO_EXPIRIES);
		/* RFC 5681 (4): halve once per loss episode; then one segment at a time,
		 * everything from snd_una sent again as the window grows */
		if (!(c->tx_flags & FS_TX_F_LOSS))
			c->ssthresh = flight / 2 > 2 * seg ? flight / 2 : 2 * seg;
		c->cwnd = seg;
		c->tx_next = c->snd_una;
		c->recover = c->snd_nxt;
		c->dupacks = 0;
		c->tx_flags &= ~(FS_TX_F_RECOVERY | FS_TX_F_RESEND | FS_TX_F_TLP_DUE);
		c->tx_flags |= FS_TX_F_LOSS;
	} else {
		c->tx_flags |= FS_TX_F_PROBE;
	}
	/* RFC 6298 5.5/5.6: back off, and keep timing in case this kick is lost
	 * (a reset gets one more chance, then the entry is left to expire) */
	c->rto_ms = c->rto_ms * 2 > FS_RTO_MAX_MS ? FS_RTO_MAX_MS : c->rto_ms * 2;
	if (c->retries <= FS_RTO_TRIES + 1)
		*rearm_ms = c->rto_ms;
	return 1;
}

/* The retransmission / probe timer fired. No packet is at hand: ask user space
 * for a kick (see the top). */
static int conn_timer_fired(void *map, struct fs_tuple *key, struct fs_conn *c)
{
	__u32 slot = conn_lock_slot(key), ms;
	int due;

	/* busy on another CPU, which restarts the timer as it sees fit: look again soon */
	if (!conn_trylock(slot)) {
		bpf_timer_start(&c->rto_timer, NSEC_PER_MSEC, 0);
		return 0;
	}
	due = sender_expire(c, &ms);
	if (due && ms)
		bpf_timer_start(&c->rto_timer, (__u64)ms * NSEC_PER_MSEC, 0);
	conn_unlock(slot);
	if (due)
		bpf_ringbuf_output(&kicks, key, sizeof(*key), 0);
	return 0;
}

/* One connection of `timerless`: if its time came, as conn_timer_fired, unless it has
 * a timer of its own by now or is gone (then it leaves the list). */
static long timerless_step(struct bpf_map *map, struct fs_tuple *key, __u64 *due, void *ctx)
{
	__u64 now = *(__u64 *)ctx;
	__u32 slot, ms = 0;
	struct fs_conn *c;
	int expired = 0;

	if (now < *due)
		return 0;
	slot = conn_lock_slot(key);
	if (!conn_trylock(slot))
		return 0;	/* busy: the next round */
	c = bpf_map_lookup_elem(&conn_track, key);
	if (c && !(c->tx_flags & FS_TX_F_TIMER))
		expired = sender_expire(c, &ms);
	if (expired && ms)
		*due = now + (__u64)ms * NSEC_PER_MSEC;
	else
		bpf_map_delete_elem(&timerless, key);
	conn_unlock(slot);
	if (expired)
		bpf_ringbuf_output(&kicks, key, sizeof(*key), 0);
	return 0;
}

static int sweeper_fired(void *map, __u32 *key, struct sweeper *sw)
{
	__u64 now = bpf_ktime_get_ns();

	bpf_for_each_map_elem(&timerless, timerless_step, &now, 0);
	bpf_timer_start(&sw->timer, FS_PTO_MIN_MS * NSEC_PER_MSEC, 0);
	return 0;
}

/* Work out and the client silent for two RTOs and at least FS_WATCHDOG_MS: its
 * timer or a kick got lost, since the timer would have fired first. Without a
 * timer (its memory could not be had yet), one RTO of silence is enough. Keep
 * in step with fileserver_ctl/retransmit.py's sweep. */
static __always_inline int sender_stalled(const struct fs_conn *c, __u64 now)
{
	__u64 quiet = (__u64)c->rto_ms * 2;

	if (!(c->tx_flags & FS_TX_F_TIMER))
		quiet = c->rto_ms;
	else if (quiet < FS_WATCHDOG_MS)
		quiet = FS_WATCHDOG_MS;
	return now - c->last_seen_ns > quiet * NSEC_PER_MSEC;
}

#endif /* __SENDER_BPF_H */
