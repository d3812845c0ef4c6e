/* SPDX-License-Identifier: GPL-2.0 */
/* Per-connection state in conn_track: created by a valid handshake ACK. */
#ifndef __CONN_BPF_H
#define __CONN_BPF_H

#include "cookie.bpf.h"
#include "tcp.bpf.h"

static __always_inline int seq_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

static __always_inline int seq_after(__u32 a, __u32 b)
{
	return (__s32)(b - a) < 0;
}

/* The entry of p's tuple; owned entries silent for too long count as gone. */
static __always_inline struct fs_conn *conn_lookup(const struct pkt *p, __u64 now)
{
	struct fs_conn *c = bpf_map_lookup_elem(&conn_track, &p->tuple);

	if (c && c->state != FS_CONN_HANDED_OFF && now - c->last_seen_ns > FS_CONN_IDLE_NS) {
		bpf_map_delete_elem(&conn_track, &p->tuple);
		return NULL;
	}
	return c;
}

/*
 * A non-SYN segment without state: if it acknowledges one of our cookies,
 * the handshake is complete and the connection is ours from now on. *created
 * says whether this call made the entry: the handshake ACK and the request
 * can miss the lookup together on two CPUs, and the second must take the
 * first one's entry, never overwrite it (and the answer and timer it holds).
 */
static __always_inline struct fs_conn *conn_from_cookie(const struct pkt *p, __u64 now,
							int *created)
{
	struct scratch *s = scratch_get();
	struct cookie_opts o = {};
	struct fs_conn *c;

	if (!s || cookie_check(&p->tuple, p->seq - 1, p->ack_seq - 1, &o))
		return NULL;
	c = (struct fs_conn *)s->conn_new;
	__builtin_memset(c, 0, sizeof(s->conn_new));
	c->last_seen_ns = now;
	c->rcv_nxt = p->seq;
	c->snd_nxt = p->ack_seq;
	c->snd_una = p->ack_seq;
	c->mss = o.mss;
	c->state = FS_CONN_OPEN;
	if (o.wscale != NO_WSCALE) {
		c->flags |= FS_CONN_F_WSCALE;
		c->snd_wscale = o.wscale;
		c->rcv_wscale = OUR_WSCALE;
	}
	if (o.sack_ok)
		c->flags |= FS_CONN_F_SACK;
	if (o.ecn_ok)
		c->flags |= FS_CONN_F_ECN;
	/* timestamps were agreed iff the client keeps sending them */
	if (p->has_ts) {
		c->flags |= FS_CONN_F_TSTAMP;
		c->ts_recent = p->tsval;
	}
	c->snd_wnd = (__u32)p->window << c->snd_wscale;
	*created = !bpf_map_update_elem(&conn_track, &p->tuple, s->conn_new, BPF_NOEXIST);
	return bpf_map_lookup_elem(&conn_track, &p->tuple);
}

/* Header fields every segment of an owned connection carries. */
static __always_inline void conn_seg(const struct fs_conn *c, struct seg *g, __u8 flags)
{
	g->flags = flags | TCP_FLAG_ACK;
	if (c->flags & FS_CONN_F_ECE)
		g->flags |= TCP_FLAG_ECE;
	g->ack = c->rcv_nxt;
	g->seq = c->snd_nxt;
	g->window = OUR_WINDOW >> c->rcv_wscale;
	g->wscale = NO_WSCALE;
	if (c->flags & FS_CONN_F_TSTAMP) {
		g->ts = 1;
		g->tsval = tcp_now_ms();
		g->tsecr = c->ts_recent;
	}
}

#endif /* __CONN_BPF_H */
