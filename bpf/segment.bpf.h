/* SPDX-License-Identifier: GPL-2.0 */
/*
 * One segment of an answer, made from the cache entry at any offset of it: the
 * head (the stored head, the Date the answer went out with, "Connection:
 * close" when closing), then body bytes from the version's stream
 * (stream.bpf.h). Nothing is kept per segment, so a segment is made again from
 * its sequence number alone.
 *
 * Checksums: a CHECKSUM_PARTIAL skb (requests and ACKs from a local stack:
 * loopback, veth) only needs the pseudo-header sum, the device or the stack
 * completes it. Any other skb gets its payload read back in 512-byte pieces
 * and summed with bpf_csum_diff; that covers head, Date and body at any
 * offset alike. Measured (wrk, 64 KiB keep-alive on lo, bpf_stats, a build
 * forced to sum): 11-13 us of program time per answer without the sum, 17-19
 * us with it. Per-chunk sums from user space would save little of that where
 * it is needed: chunks never line up with 1,448-byte segments, so most of each
 * segment would still be summed here, at odd offsets besides.
 *
 * The work is split into global functions: the verifier checks each once,
 * whatever calls it, which keeps the program far from its 1M-instruction limit.
 */
#ifndef __SEGMENT_BPF_H
#define __SEGMENT_BPF_H

#include "tcp.bpf.h"
#include "answer.bpf.h"

#define TX_HEAD_MASK	511		/* head offsets and lengths stay below 512 */
#define TX_SUM_PIECE	512		/* bpf_csum_diff takes at most 512 bytes */

/* A segment's TCP flags beyond ACK (sender_work.flags). */
#define TX_SEG_FIN	TCP_FLAG_FIN
#define TX_SEG_RST	TCP_FLAG_RST
#define TX_SEG_PSH	TCP_FLAG_PSH

/* What one run of the sender sends: a copy of the answer's fields and the plan. */
struct sender_work {
	struct seg seg;			/* header fields shared by the planned segments */
	__u64 data_id;			/* the answer's version in file_data */
	__u32 body_off;			/* its body's offset in that stream */
	__u32 resp_seq;
	__u32 resp_len;
	__u32 resp_head;
	__u32 n;			/* segments planned */
	__u32 seq[FS_BURST_MAX + 1];
	__u16 len[FS_BURST_MAX + 1];
	__u8 flags[FS_BURST_MAX + 1];	/* TX_SEG_* */
	__u8 base_flags;		/* ACK, and ECE while echoing CE */
	__u8 head_ok;			/* head holds this answer's head */
	__u8 head[2 * (TX_HEAD_MASK + 1)] __attribute__((aligned(8)));
	/* the stream's first FS_HEAD_ROOM bytes (the 200 head), for the 304 head and ETag */
	__u8 stream0[TX_HEAD_MASK + 1 + 8] __attribute__((aligned(8)));
	__u8 sum[TX_SUM_PIECE + 8] __attribute__((aligned(8)));
};

/* [0] -> this CPU's struct sender_work */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sender_work);
} tx_scratch SEC(".maps");

static __always_inline struct sender_work *sender_work_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&tx_scratch, &zero);
}

/* Eth + IP + TCP header bytes of our segments on this connection. */
static __always_inline __u32 seg_header_len(const struct pkt *p, const struct seg *g)
{
	return sizeof(struct ethhdr) +
	       (p->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) +
	       sizeof(struct tcphdr) + (g->ts ? TS_OPT_LEN : 0);
}

static const char status304[FS_304_STATUS_LEN + 1] = "HTTP/1.1 304 Not Modified\r\n";

_Static_assert(sizeof(status304) == FS_304_STATUS_LEN + 1, "304 status line");
_Static_assert(FS_HEAD_ROOM <= TX_HEAD_MASK + 1, "head room in w->head and w->stream0");

/* Bytes of e's stream: the 200 head, then the body. */
static __always_inline __u32 entry_stream_len(const struct fs_entry *e)
{
	return (__u32)e->head_len + e->body_len;
}

/*
 * The first FS_HEAD_ROOM bytes of e's stream (its 200 head) into w->head
 * (into_head) or w->stream0.
 */
__noinline int fs_head_load(const struct fs_entry *e, __u32 into_head)
{
	struct sender_work *w = sender_work_get();

	if (!w || !e)
		return -1;
	return head_load(into_head ? w->head : w->stream0, e->data_id, entry_stream_len(e));
}

/* The request's If-None-Match (in the scratch) is e's ETag, read from its 200 head. */
__noinline int fs_etag_matches(const struct fs_entry *e)
{
	struct sender_work *w = sender_work_get();
	struct scratch *s = scratch_get();
	__u32 n, off, k;

	if (!w || !s || !e)
		return 0;
	n = s->http.inm_len;
	off = e->etag_off;
	if (n != e->etag_len || n == 0 || n > ETAG_CMP_MAX || off > FS_HEAD_MAX ||
	    off + n > e->head_len)
		return 0;
	if (fs_head_load(e, 0))
		return 0;		/* replaced under us: user space decides */
	for (k = 0; k < ETAG_CMP_MAX; k++) {
		if (k >= n)
			break;
		if (req_at(s, s->http.inm_off + k) != w->stream0[off + k])
			return 0;
	}
	return 1;
}

/*
 * The 304 head into w->head: its status line, then the entry's slices of the 200
 * head (fileserver.h: struct fs_entry), copied 8 bytes at a time; what a copy puts
 * past its slice the next slice overwrites, or it lies past the head. Loaded:
 * w->stream0 holds e's first bytes already (fs_etag_matches in this run). Returns
 * its length.
 */
__noinline int fs_head304(const struct fs_entry *e, __u32 loaded)
{
	struct sender_work *w = sender_work_get();
	__u32 i, k, off, len, head_len, pos = FS_304_STATUS_LEN;

	if (!w || !e)
		return -1;
	head_len = e->head_len;
	if (head_len > FS_HEAD_MAX)
		return -1;
	if (!loaded && fs_head_load(e, 0))
		return -1;
	__builtin_memcpy(w->head, status304, FS_304_STATUS_LEN);
	for (i = 0; i < FS_304_SLICES; i++) {
		off = e->s304_off[i];
		len = e->s304_len[i];
		if (off > FS_HEAD_MAX || len > FS_HEAD_MAX || off + len > head_len)
			return -1;
#pragma unroll
		for (k = 0; k < FS_HEAD_MAX / 8; k++) {
			if (k * 8 >= len)
				break;
			*(__u64 *)&w->head[(pos + k * 8) & TX_HEAD_MASK] =
				*(const __u64 *)&w->stream0[(off + k * 8) & TX_HEAD_MASK];
		}
		pos += len;
		if (pos > FS_HEAD_MAX)
			return -1;
	}
	return pos;
}

/*
 * An answer's head into w->head: the stored 200 head (chunk 0 of the version's
 * stream) or the 304 head built from it, the answer's Date, and "Connection:
 * close" before the final CRLF when closing. Returns its length.
 */
static __always_inline int head_make(struct sender_work *w, const struct fs_entry *e, __u32 v,
				     const char *date)
{
	__u32 len, date_off;
	int n;

	if (v >= FS_RESP_304) {
		n = fs_head304(e, 0);
		if (n < 0)
			return -1;
		len = n;
		date_off = head304_date_off(e);
	} else {
		/* the 200 head starts the stream */
		if (fs_head_load(e, 1))
			return -1;
		len = e->head_len;
		date_off = e->date_off;
	}
	if (len < 4 || len > FS_HEAD_MAX || date_off + FS_DATE_LEN > len)
		return -1;
	__builtin_memcpy(&w->head[date_off & TX_HEAD_MASK], date, FS_DATE_LEN);
	if (v & 1) {	/* each *_CLOSE variant is odd */
		__builtin_memcpy(&w->head[(len - 2) & TX_HEAD_MASK], close_trailer, CLOSE_TRAILER_LEN);
		len += CLOSE_EXTRA;
	}
	w->head_ok = 1;
	return len;
}

/* The head of the answer c is sending into w->head (with the Date it went out with). */
static __always_inline int head_build(struct sender_work *w, const struct fs_entry *e,
				      const struct fs_conn *c)
{
	return head_make(w, e, c->resp_variant, c->date);
}

/*
 * The 304 head of e, less its final CRLF when closing (the caller writes the rest),
 * into the skb at pos: len bytes. Called after fs_etag_matches() found the ETag in
 * the same run, which left e's first bytes in w->stream0.
 */
__noinline int fs_put_head304(struct __sk_buff *skb, __u32 pos, const struct fs_entry *e, __u32 len)
{
	struct sender_work *w = sender_work_get();
	int n;

	if (!w || !e)
		return -1;
	n = fs_head304(e, 1);
	if (n < 0 || len > (__u32)n)
		return -1;
	barrier_var(len);
	if (len < 1 || len > TX_HEAD_MASK)
		return -1;
	return bpf_skb_store_bytes(skb, pos, w->head, len, 0);
}

/* Folded sum of len payload bytes at off in the skb (little-endian words, csum.bpf.h). */
__noinline int fs_payload_sum(struct __sk_buff *skb, __u32 off, __u32 len)
{
	struct sender_work *w = sender_work_get();
	__u32 i, done = 0, n;
	__u64 sum = 0;
	long part;

	if (!w || len > FS_SEGMENT_MAX)
		return -1;
	/* whole pieces: a constant size keeps the verifier's states few */
	for (i = 0; i < FS_SEGMENT_MAX / TX_SUM_PIECE; i++) {
		if (done + TX_SUM_PIECE > len)
			break;
		if (bpf_skb_load_bytes(skb, off + done, w->sum, TX_SUM_PIECE))
			return -1;
		part = bpf_csum_diff(NULL, 0, (__be32 *)w->sum, TX_SUM_PIECE, 0);
		sum += (__u32)part;
		done += TX_SUM_PIECE;
	}
	n = len - done;
	if (n > TX_SUM_PIECE)
		return -1;
	if (n) {
		/* zero the word the last bytes share: padding adds nothing to the sum */
		*(__u32 *)&w->sum[n & ~3u] = 0;
		if (bpf_skb_load_bytes(skb, off + done, w->sum, n))
			return -1;
		part = bpf_csum_diff(NULL, 0, (__be32 *)w->sum, (n + 3) & ~3u, 0);
		sum += (__u32)part;
	}
	return csum_fold16(sum);
}

/*
 * Payload bytes [off, off + len) of the answer into the skb at pos: the head
 * from w->head, the rest from the version's stream.
 */
__noinline int fs_put_payload(struct __sk_buff *skb, __u32 pos, __u32 off, __u32 len)
{
	struct sender_work *w = sender_work_get();
	__u32 n;

	if (!len)
		return 0;
	if (!w || off > w->resp_len || len > w->resp_len - off || len > FS_SEGMENT_MAX)
		return -1;
	if (off < w->resp_head) {
		if (!w->head_ok || w->resp_head > TX_HEAD_MASK)
			return -1;
		n = w->resp_head - off;
		if (n > len)
			n = len;
		barrier_var(n);
		if (n < 1 || n > TX_HEAD_MASK)
			return -1;
		if (bpf_skb_store_bytes(skb, pos, &w->head[off & TX_HEAD_MASK], n, 0))
			return -1;
		pos += n;
		off += n;
		len -= n;
	}
	if (!len)
		return 0;
	/* a GET's body (HEAD and 304 answers are all head): the stream ends with it */
	return fs_put_stream(skb, pos, w->data_id, w->body_off + off - w->resp_head, len,
			     w->body_off + w->resp_len - w->resp_head);
}

/* The headers of w->seg for len payload bytes whose sum is sum. */
__noinline int fs_put_headers(struct __sk_buff *skb, __u32 hdr_len, __u32 len, __u32 sum)
{
	struct scratch *s = scratch_get();
	struct sender_work *w = sender_work_get();

	if (!s || !w)
		return -1;
	w->seg.payload_len = len;
	w->seg.payload_sum = sum;
	if (build_headers(s, &s->pkt, &w->seg) != hdr_len || hdr_len > sizeof(s->hdr) - 2)
		return -1;
	return bpf_skb_store_bytes(skb, 0, &s->hdr.eth, hdr_len, 0);
}

/* Turn the skb into planned segment i of w: headers from the packet at hand and w->seg. */
__noinline int fs_emit_segment(struct __sk_buff *skb, __u32 i)
{
	struct scratch *s = scratch_get();
	struct sender_work *w = sender_work_get();
	__u32 len, hdr_len;
	int sum = 0;

	if (!s || !w || i > FS_BURST_MAX)
		return -1;
	len = w->len[i];
	w->seg.seq = w->seq[i];
	w->seg.flags = w->base_flags | w->flags[i];
	hdr_len = seg_header_len(&s->pkt, &w->seg);
	if (bpf_skb_change_tail(skb, hdr_len + len, 0))
		return -1;
	if (fs_put_payload(skb, hdr_len, w->seq[i] - w->resp_seq, len))
		return -1;
	/* the device completes the sum of a CHECKSUM_PARTIAL skb */
	if (len && !w->seg.partial) {
		sum = fs_payload_sum(skb, hdr_len, len);
		if (sum < 0)
			return -1;
	}
	return fs_put_headers(skb, hdr_len, len, sum);
}

#endif /* __SEGMENT_BPF_H */
