/* SPDX-License-Identifier: GPL-2.0 */
/*
 * SACK blocks (RFC 2018) as the sender's scoreboard: the blocks of the ACK at
 * hand, clipped, D-SACKs left out, in order, and what they say is lost.
 */
#ifndef __SACK_BPF_H
#define __SACK_BPF_H

#include "conn.bpf.h"

/*
 * What the ACK at hand says arrived beyond snd_una: its SACK blocks clipped to
 * (snd_una, snd_nxt], D-SACKs (RFC 2883: a first block below the ACK or inside
 * the second) left out. Nothing of it is kept: a receiver repeats its blocks,
 * up to three of them with timestamps, the most recent first, and three holes
 * at once are rare; a range SACKed earlier and not repeated is at worst sent
 * again.
 */
struct sack_view {
	__u32 start[4];			/* in order; an empty block (start == end) is none */
	__u32 end[4];
	__u32 n;			/* blocks that are not empty */
	__u32 sacked;			/* bytes in the blocks */
	__u32 high;			/* highest right edge, snd_una when none */
	__u32 lost_end;			/* what no block holds below this is lost (sack_lost_end) */
	/* what the view is made against, the connection's as it is (sack_view_get) */
	__u32 snd_una;
	__u32 snd_nxt;
	__u32 snd_end;
	__u32 seg;
	__u32 dupacks;
};

/* Blocks a and b in order (a sorting network step). */
static __always_inline void sack_order(struct sack_view *v, __u32 a, __u32 b)
{
	__u32 s = v->start[a], e = v->end[a];

	if (!seq_after(s, v->start[b]))
		return;
	v->start[a] = v->start[b];
	v->end[a] = v->end[b];
	v->start[b] = s;
	v->end[b] = e;
}

/*
 * Where the data deemed lost ends: what no block holds below it (RFC 6675
 * IsLost: more than DupThresh - 1 segments SACKed above). With nothing new to
 * send, any SACK above a hole will do, as no more can come (RFC 5827's idea,
 * for any flight): everything sent after the hole arrived. Without SACK, three
 * duplicate ACKs (fewer for a small flight) lose the first segment. snd_una
 * when nothing is lost.
 */
static __always_inline __u32 sack_lost_end(const struct sack_view *v)
{
	__u32 seg = v->seg, flight = v->snd_nxt - v->snd_una, thresh = 3, out, above = 0;
	__u32 lost = v->snd_una;
	int all_sent = !seq_before(v->snd_nxt, v->snd_end), k;

	if (all_sent) {
		out = seg ? (flight + seg - 1) / seg : 1;
		if (out < 4)
			thresh = out > 1 ? out - 1 : 1;	/* RFC 5827 */
	}
	if (!v->n) {
		if (v->dupacks >= thresh)
			lost = v->snd_una + (flight < seg ? flight : seg);
		return lost;
	}
	/* blocks are in order and apart: what is SACKed above one is a suffix sum */
#pragma unroll
	for (k = 3; k >= 0; k--) {
		above += v->end[k] - v->start[k];
		if (v->start[k] != v->end[k] && lost == v->snd_una &&
		    (all_sent || above > (thresh - 1) * seg))
			lost = v->start[k];
	}
	return lost;
}

/* Fill v with p's blocks against the sequence numbers v holds (sack_view_base). */
static __always_inline void sack_fill(struct sack_view *v, const struct pkt *p)
{
	__u32 k, s, e, n = 0, una = v->snd_una, nxt = v->snd_nxt;

	v->sacked = 0;
	v->high = una;
#pragma unroll
	for (k = 0; k < 4; k++) {
		v->start[k] = v->end[k] = una;
		if (k >= p->sack_count)
			continue;
		s = p->sack_start[k];
		e = p->sack_end[k];
		if (k == 0 && p->sack_count > 1 && !seq_before(s, p->sack_start[1]) &&
		    !seq_after(e, p->sack_end[1]))
			continue;
		if (seq_before(s, una))
			s = una;
		if (seq_after(e, nxt))
			e = nxt;
		if (!seq_before(s, e))
			continue;
		v->start[k] = s;
		v->end[k] = e;
		n++;
		v->sacked += e - s;
		if (seq_after(e, v->high))
			v->high = e;
	}
	v->n = n;
	if (n > 1) {
		sack_order(v, 0, 1);
		sack_order(v, 2, 3);
		sack_order(v, 0, 2);
		sack_order(v, 1, 3);
		sack_order(v, 1, 2);
	}
	v->lost_end = sack_lost_end(v);
}

/* Where the block holding seq ends; seq itself when no block holds it. */
static __always_inline __u32 sack_skip(const struct sack_view *v, __u32 seq)
{
	__u32 k;

#pragma unroll
	for (k = 0; k < 4; k++)
		if (!seq_before(seq, v->start[k]) && seq_before(seq, v->end[k]))
			seq = v->end[k];
	return seq;
}

/* The first block start after seq, or limit if none comes before it. */
static __always_inline __u32 sack_next(const struct sack_view *v, __u32 seq, __u32 limit)
{
	__u32 k;

#pragma unroll
	for (k = 0; k < 4; k++)
		if (seq_after(v->start[k], seq) && seq_before(v->start[k], limit))
			limit = v->start[k];
	return limit;
}

/* SACKed bytes in [from, to). */
static __always_inline __u32 sack_between(const struct sack_view *v, __u32 from, __u32 to)
{
	__u32 k, s, e, sum = 0;

#pragma unroll
	for (k = 0; k < 4; k++) {
		s = seq_after(v->start[k], from) ? v->start[k] : from;
		e = seq_before(v->end[k], to) ? v->end[k] : to;
		if (seq_before(s, e))
			sum += e - s;
	}
	return sum;
}

#endif /* __SACK_BPF_H */
