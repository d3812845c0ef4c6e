/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Answers from file_cache: pick the variant (200/304, GET/HEAD, keep-alive or
 * close); one that fits one segment and the client's window is written over
 * the request skb (longer ones: segment.bpf.h and sender.bpf.h): the head and
 * body from the version's stream (the 200 head and the body are
 * contiguous there, so a keep-alive answer is one copy; a 304 head is built
 * from slices of the 200 head, segment.bpf.h), "Connection: close" when
 * closing, then the current Date over the stored one. The payload checksum
 * comes precomputed from user space without the Date, whose sum (also from user
 * space, in http_date) the program adds.
 */
#ifndef __ANSWER_BPF_H
#define __ANSWER_BPF_H

#include "http.bpf.h"
#include "tcp.bpf.h"
#include "stream.bpf.h"

#define CLOSE_TRAILER_LEN	21	/* "Connection: close\r\n\r\n" */
#define CLOSE_EXTRA		19	/* what it adds to a head */
#define ETAG_CMP_MAX		64

static const char close_trailer[CLOSE_TRAILER_LEN + 3] = "Connection: close\r\n\r\n";

/* segment.bpf.h: e's 304 head (len bytes of it) into the skb at pos, after fs_etag_matches() */
__noinline int fs_put_head304(struct __sk_buff *skb, __u32 pos, const struct fs_entry *e, __u32 len);
/* segment.bpf.h: the request's If-None-Match is e's ETag (read from its 200 head) */
__noinline int fs_etag_matches(const struct fs_entry *e);

/* Where the Date value is in e's 304 head: in its first slice, after the status line. */
static __always_inline __u32 head304_date_off(const struct fs_entry *e)
{
	return FS_304_STATUS_LEN + e->date_off - e->s304_off[0];
}

/* What to send for one request. */
struct answer {
	__u32 variant;			/* enum fs_resp */
	__u32 head_len;			/* its head's bytes (before close) */
	__u32 date_off;
	__u32 body_len;			/* 0 for HEAD and 304 */
	__u32 payload_len;
	__u8 close;
	__u8 not_modified;
	__u8 segments;			/* longer than one segment or the window */
};

/* Fill a; returns 0 or the hand-off reason. */
static __always_inline __u32 answer_choose(const struct scratch *s, const struct http_req *r,
					   const struct fs_entry *e, const struct fs_conn *c,
					   struct answer *a)
{
	if ((e->flags & FS_ENTRY_F_ENCODED) && r->accept_encoding)
		return FS_STAT_HANDOFF_HEADER;
	if (r->has_inm) {
		/* a list, a weak tag or '*' all mean: let user space decide; so does an
		 * entry whose 304 head the program cannot build */
		if ((e->flags & FS_ENTRY_F_NO_304) || !fs_etag_matches(e))
			return FS_STAT_HANDOFF_CONDITIONAL;
		a->not_modified = 1;
	} else if (r->has_ims) {
		return FS_STAT_HANDOFF_CONDITIONAL;
	}
	a->close = http_wants_close(r);
	if (a->not_modified) {
		a->variant = FS_RESP_304;
		a->head_len = FS_304_STATUS_LEN + e->s304_len[0] + e->s304_len[1] + e->s304_len[2];
		a->date_off = head304_date_off(e);
	} else {
		a->variant = r->method == HTTP_HEAD ? FS_RESP_HEAD : FS_RESP_GET;
		a->head_len = e->head_len;
		a->date_off = e->date_off;
		if (r->method == HTTP_GET)
			a->body_len = e->body_len;
	}
	if (a->close)
		a->variant += 1;	/* each *_CLOSE follows its keep-alive variant */
	if (a->head_len < 4 || a->head_len > FS_HEAD_MAX || a->date_off + FS_DATE_LEN > a->head_len)
		return FS_STAT_HANDOFF_OTHER;
	if (a->body_len > FS_BODY_MAX)
		return FS_STAT_HANDOFF_TOO_LARGE;
	a->payload_len = a->head_len + (a->close ? CLOSE_EXTRA : 0) + a->body_len;
	a->segments = a->payload_len > c->seg_size || a->payload_len > c->snd_wnd;
	return 0;
}

/* Payload sum of the variant with today's Date where its sum left zeros. */
static __always_inline __u16 answer_sum(const struct fs_entry *e, const struct answer *a,
					const struct fs_date *now)
{
	__u32 v = a->variant;

	if (v >= FS_RESP_MAX)
		v = 0;
	return csum_fold16((__u64)e->csum[v] + csum_at_offset((__u16)now->sum, a->date_off));
}

/* The Date answers go out with, or NULL before user space has written one. */
static __always_inline const struct fs_date *answer_date(void)
{
	__u32 zero = 0;
	const struct fs_date *now = bpf_map_lookup_elem(&http_date, &zero);

	return now && now->value[0] ? now : NULL;
}

/* Write the answer over the request skb; g carries seq/ack/flags/timestamps.
 * -1 when a chunk vanished under us (the entry was replaced) or a helper failed. */
static __always_inline int answer_send(struct __sk_buff *skb, struct scratch *s,
				       const struct pkt *p, struct fs_entry *e,
				       const struct answer *a, struct seg *g,
				       const struct fs_date *now)
{
	__u32 hdr_len, head_len = a->head_len, len = e->head_len + e->body_len;
	__u64 id = e->data_id;
	long off;

	g->payload_len = a->payload_len;
	g->payload_sum = answer_sum(e, a, now);
	g->partial = skb_csum_partial(skb);
	hdr_len = build_headers(s, p, g);
	off = emit_headers(skb, s, hdr_len, a->payload_len);
	if (off < 0)
		return -1;
	if (a->not_modified) {
		/* the head built from the 200 head, but its final CRLF when closing */
		if (fs_put_head304(skb, off, e, a->close ? head_len - 2 : head_len))
			return -1;
		if (a->close &&
		    bpf_skb_store_bytes(skb, off + head_len - 2, close_trailer, CLOSE_TRAILER_LEN, 0))
			return -1;
	} else if (!a->close) {
		/* the 200 head and what follows it in the stream: the body for GET */
		if (fs_put_stream(skb, off, id, 0, head_len + a->body_len, len))
			return -1;
	} else {
		/* the head but its final CRLF, "Connection: close", the CRLF, the body */
		if (fs_put_stream(skb, off, id, 0, head_len - 2, len))
			return -1;
		if (bpf_skb_store_bytes(skb, off + head_len - 2, close_trailer, CLOSE_TRAILER_LEN, 0))
			return -1;
		if (fs_put_stream(skb, off + head_len + CLOSE_EXTRA, id, head_len, a->body_len, len))
			return -1;
	}
	if (bpf_skb_store_bytes(skb, off + a->date_off, now->value, FS_DATE_LEN, 0))
		return -1;
	return 0;
}

#endif /* __ANSWER_BPF_H */
