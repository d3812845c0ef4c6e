/* SPDX-License-Identifier: GPL-2.0 */
/*
 * HTTP/1.x request parsing for the fast path. It accepts only what it can
 * answer exactly as user space would: one complete GET or HEAD, origin-form
 * path without '%', '#', "/." or "//" (a query is ignored, as user space
 * ignores it), HTTP/1.0 or 1.1, at most HTTP_FIELDS_MAX well-formed header
 * lines, one Host that is plainly a host[:port] (HTTP/1.1 needs it), and for
 * HTTP/1.0 no keep-alive (user space keeps such a connection open and says so).
 * Anything else yields the hand-off reason (an FS_STAT_HANDOFF_* counter),
 * never a guess.
 */
#ifndef __HTTP_BPF_H
#define __HTTP_BPF_H

#include "maps.bpf.h"
#include "scratch.bpf.h"

/* Character classes as 128-bit sets (non-ASCII is in none of them). */
#define TCHAR_LO 0x03ff6cfa00000000ULL	/* RFC 9110 token */
#define TCHAR_HI 0x57ffffffc7fffffeULL
#define PCHAR_LO 0x2fffffd200000000ULL	/* path: unreserved, sub-delims, ':' '@' '/' */
#define PCHAR_HI 0x47fffffe87ffffffULL
#define QCHAR_LO 0xaffffff200000000ULL	/* query: path chars, '?' and '%' */
#define QCHAR_HI 0x47fffffe87ffffffULL
#define REGNAME_LO 0x2bff7fd200000000ULL	/* Host reg-name: unreserved, sub-delims */
#define REGNAME_HI 0x47fffffe87fffffeULL
#define LITERAL_LO 0x07ff400000000000ULL	/* Host IP-literal: hex digits, ':' '.' */
#define LITERAL_HI 0x0000007e0000007eULL
#define ONES  0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/*
 * Header lines the fast path takes; user space bounds a head by its size
 * alone (http_protocol.HEAD_LIMIT: 431), so a longer list goes its way.
 */
#define HTTP_FIELDS_MAX 64

/*
 * Bytes the path and Host scans take per bpf_loop call: a call (indirect,
 * plus the scratch lookup) costs more than checking a byte.
 */
#define SCAN_STRIDE 8

static __always_inline __u32 scan_calls(__u32 n)
{
	return (n + SCAN_STRIDE - 1) / SCAN_STRIDE;
}


/* Where a Host value scan is (host_step). */
enum host_state {
	HOST_START,
	HOST_NAME,			/* reg-name or IPv4address */
	HOST_LITERAL,			/* inside "[...]" */
	HOST_LITERAL_END,		/* just past ']' */
	HOST_PORT,			/* past ':' */
	HOST_TRAIL,			/* trailing spaces after a whole host */
	HOST_BAD,
};

static __always_inline int in_set(__u8 c, __u64 lo, __u64 hi)
{
	if (c < 64)
		return (lo >> c) & 1;
	if (c < 128)
		return (hi >> (c - 64)) & 1;
	return 0;
}

static __always_inline int is_alnum(__u8 c)
{
	return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

/* field-vchar / obs-text, or whitespace inside a value */
static __always_inline int is_value_char(__u8 c)
{
	return c == ' ' || c == '\t' || (c > 0x20 && c != 0x7f);
}

/*
 * Eight bytes that are all field-value characters (no control byte, no DEL;
 * spaces and obs-text allowed): the classic SWAR "has a byte below n" test.
 */
static __always_inline int value_word(__u64 w)
{
	__u64 del = w ^ (0x7f * ONES);

	return !(((w - 0x20 * ONES) & ~w & HIGHS) | ((del - ONES) & ~del & HIGHS));
}

static __always_inline __u8 req_at(const struct scratch *s, __u32 i)
{
	return s->req[i & REQ_MASK];
}

/* Case-insensitive compare of n bytes at i with a lower-case literal. Letters,
 * '-' and digits are the only token chars OR 0x20 maps onto themselves. */
static __always_inline int ci_equal(const struct scratch *s, __u32 i, const char *lit, __u32 n)
{
	__u32 k;

	for (k = 0; k < n; k++)
		if ((req_at(s, i + k) | 0x20) != lit[k])
			return 0;
	return 1;
}

#define CI_IS(s, i, n, lit) ((n) == sizeof(lit) - 1 && ci_equal(s, i, lit, sizeof(lit) - 1))

static __always_inline __u8 header_id(const struct scratch *s, __u32 i, __u32 n)
{
	switch (n) {
	case 4:
		return CI_IS(s, i, n, "host") ? H_HOST : H_OTHER;
	case 5:
		return CI_IS(s, i, n, "range") ? H_RANGE : H_OTHER;
	case 6:
		return CI_IS(s, i, n, "expect") ? H_BODY : H_OTHER;
	case 7:
		return CI_IS(s, i, n, "upgrade") ? H_UPGRADE : H_OTHER;
	case 8:
		if (CI_IS(s, i, n, "if-range"))
			return H_RANGE;
		return CI_IS(s, i, n, "if-match") ? H_CONDITIONAL : H_OTHER;
	case 10:
		return CI_IS(s, i, n, "connection") ? H_CONNECTION : H_OTHER;
	case 13:
		if (CI_IS(s, i, n, "content-range"))
			return H_CONTENT_RANGE;
		return CI_IS(s, i, n, "if-none-match") ? H_IF_NONE_MATCH : H_OTHER;
	case 14:
		return CI_IS(s, i, n, "content-length") ? H_BODY : H_OTHER;
	case 15:
		return CI_IS(s, i, n, "accept-encoding") ? H_ACCEPT_ENCODING : H_OTHER;
	case 17:
		if (CI_IS(s, i, n, "if-modified-since"))
			return H_IF_MODIFIED_SINCE;
		return CI_IS(s, i, n, "transfer-encoding") ? H_BODY : H_OTHER;
	case 19:
		return CI_IS(s, i, n, "if-unmodified-since") ? H_CONDITIONAL : H_OTHER;
	}
	return H_OTHER;
}

/* A header line is complete: record what matters about it. */
static __always_inline __u32 header_done(const struct scratch *s, struct http_req *r)
{
	__u32 vs = r->value_start, n = r->value_end - r->value_start;

	switch (r->hdr) {
	case H_HOST:
		/* repeated: 400 in user space (RFC 9110 §7.2); the value is checked last */
		if (++r->hosts > 1)
			return FS_STAT_HANDOFF_HOST;
		r->host_start = vs;
		r->host_end = r->value_end;
		break;
	case H_CONNECTION:
		if (r->conn != HTTP_CONN_DEFAULT)
			return FS_STAT_HANDOFF_HEADER;
		if (CI_IS(s, vs, n, "close"))
			r->conn = HTTP_CONN_CLOSE;
		else if (CI_IS(s, vs, n, "keep-alive"))
			r->conn = HTTP_CONN_KEEP_ALIVE;
		else
			return FS_STAT_HANDOFF_HEADER;
		break;
	case H_IF_NONE_MATCH:
		if (r->has_inm)
			return FS_STAT_HANDOFF_CONDITIONAL;
		r->has_inm = 1;
		r->inm_off = vs;
		r->inm_len = n;
		break;
	case H_IF_MODIFIED_SINCE:
		/* repeated: 400 in user space (a singleton field, as nginx), even when a
		 * matching If-None-Match would make it irrelevant here */
		if (r->has_ims)
			return FS_STAT_HANDOFF_CONDITIONAL;
		r->has_ims = 1;
		break;
	case H_CONDITIONAL:
		return FS_STAT_HANDOFF_CONDITIONAL;
	case H_RANGE:
		return FS_STAT_HANDOFF_RANGE;
	case H_BODY:
		return FS_STAT_HANDOFF_BODY;
	case H_UPGRADE:
	case H_CONTENT_RANGE:
		return FS_STAT_HANDOFF_HEADER;
	case H_ACCEPT_ENCODING:
		r->accept_encoding = 1;
		break;
	}
	return 0;
}

/*
 * Byte i of a bpf_loop scan from r->base (past what the header scan jumped
 * over): its offset in *pos, the byte in *c. NULL once past the request.
 */
static __always_inline struct scratch *scan_byte(__u64 i, __u32 *pos, __u8 *c)
{
	struct scratch *s = scratch_get();
	struct http_req *r;

	if (!s)
		return NULL;
	r = &s->http;
	*pos = r->base + (__u32)i + r->skip;
	if (*pos >= r->len)
		return NULL;
	*c = req_at(s, *pos);
	return s;
}

/* One byte of the header block; returns 1 to stop the loop. */
static long header_step(__u64 i, void *ctx)
{
	struct scratch *s;
	struct http_req *r;
	__u32 pos;
	__u8 c;

	s = scan_byte(i, &pos, &c);
	if (!s)
		return 1;
	r = &s->http;

	switch (r->state) {
	case ST_LINE_START:
		if (c == '\r') {
			r->state = ST_END_LF;
		} else if (in_set(c, TCHAR_LO, TCHAR_HI)) {
			if (++r->fields > HTTP_FIELDS_MAX) {
				r->reason = FS_STAT_HANDOFF_HEADER;
				return 1;
			}
			r->name_start = pos;
			r->state = ST_NAME;
		} else {
			/* obs-fold, stray whitespace or garbage */
			r->reason = FS_STAT_HANDOFF_HEADER;
			return 1;
		}
		return 0;
	case ST_NAME:
		if (c == ':') {
			r->hdr = header_id(s, r->name_start, pos - r->name_start);
			r->value_start = r->value_end = pos + 1;
			r->state = ST_OWS;
		} else if (!in_set(c, TCHAR_LO, TCHAR_HI)) {
			r->reason = FS_STAT_HANDOFF_HEADER;
			return 1;
		}
		return 0;
	case ST_OWS:
	case ST_VALUE:
		if (c == '\r') {
			if (r->state == ST_OWS)
				r->value_start = r->value_end = pos;
			r->reason = header_done(s, r);
			r->state = ST_LF;
			return r->reason != 0;
		}
		if (!is_value_char(c)) {
			r->reason = FS_STAT_HANDOFF_HEADER;
			return 1;
		}
		if (c == ' ' || c == '\t')
			return 0;
		if (r->state == ST_OWS) {
			r->value_start = pos;
			r->state = ST_VALUE;
		}
		r->value_end = pos + 1;
		/*
		 * Values only checked for what they hold (the ones compared, like
		 * Connection, are read byte by byte): skip whole words of plain
		 * value bytes. value_end may then count trailing spaces; only its
		 * distance from value_start > 0 is used for these (Host's own
		 * check takes them).
		 */
		if ((r->hdr == H_OTHER || r->hdr == H_HOST || r->hdr == H_ACCEPT_ENCODING ||
		     r->hdr == H_IF_MODIFIED_SINCE) && pos + 9 <= r->len &&
		    value_word(*(__u64 *)&s->req[(pos + 1) & REQ_MASK])) {
			r->skip += 8;
			r->value_end = pos + 9;
		}
		return 0;
	case ST_LF:
		if (c != '\n') {
			r->reason = FS_STAT_HANDOFF_HEADER;
			return 1;
		}
		r->state = ST_LINE_START;
		return 0;
	case ST_END_LF:
		if (c != '\n')
			r->reason = FS_STAT_HANDOFF_HEADER;
		else
			r->end = pos + 1;
		return 1;
	}
	return 1;
}

/*
 * One byte of the Host value at pos; returns 1 to stop the scan. The kernel
 * vouches only for a plain RFC 3986 host: a reg-name (without pct-encoding) or
 * IPv4address starting with a letter or digit, or an IPv6 literal in
 * brackets, then an optional ":" port of digits, no ".." anywhere. User space
 * (http_semantics.valid_host) takes all of these; the rest is its to judge.
 */
static __always_inline int host_byte(struct http_req *r, __u8 c)
{
	__u8 prev = r->host_prev, state = r->host_state;

	r->host_prev = c;
	r->host_state = HOST_BAD;
	if (c == '.' && prev == '.')
		return 1;
	if (c == ' ' || c == '\t') {
		if (state == HOST_NAME || state == HOST_LITERAL_END || state == HOST_PORT ||
		    state == HOST_TRAIL)
			r->host_state = HOST_TRAIL;
		return r->host_state == HOST_BAD;
	}
	switch (state) {
	case HOST_START:
		if (c == '[')
			r->host_state = HOST_LITERAL;
		else if (is_alnum(c))
			r->host_state = HOST_NAME;
		break;
	case HOST_NAME:
		if (c == ':')
			r->host_state = HOST_PORT;
		else if (in_set(c, REGNAME_LO, REGNAME_HI))
			r->host_state = HOST_NAME;
		break;
	case HOST_LITERAL:
		if (c == ']' && prev != '[')
			r->host_state = HOST_LITERAL_END;
		else if (in_set(c, LITERAL_LO, LITERAL_HI))
			r->host_state = HOST_LITERAL;
		break;
	case HOST_LITERAL_END:
		if (c == ':')
			r->host_state = HOST_PORT;
		break;
	case HOST_PORT:
		if (c >= '0' && c <= '9')
			r->host_state = HOST_PORT;
		break;
	}
	return r->host_state == HOST_BAD;
}

/* SCAN_STRIDE bytes of the Host value from r->base; returns 1 to stop the loop. */
static long host_step(__u64 i, void *ctx)
{
	struct scratch *s = scratch_get();
	struct http_req *r;
	__u32 k, pos;

	if (!s)
		return 1;
	r = &s->http;
#pragma unroll
	for (k = 0; k < SCAN_STRIDE; k++) {
		pos = r->base + (__u32)i * SCAN_STRIDE + k;
		if (pos >= r->host_end || pos >= r->len)
			return 1;
		if (host_byte(r, req_at(s, pos)))
			return 1;
	}
	return 0;
}

/* Whether the Host value recorded in r is one host_step vouches for. */
static __always_inline int host_plain(struct http_req *r)
{
	r->base = r->host_start;
	bpf_loop(scan_calls(r->host_end - r->host_start), host_step, NULL, 0);
	return r->host_state == HOST_NAME || r->host_state == HOST_LITERAL_END ||
	       r->host_state == HOST_PORT || r->host_state == HOST_TRAIL;
}

/* Byte k of the path, at pos; returns 1 to stop the scan. */
static __always_inline int path_byte(struct scratch *s, struct http_req *r, __u32 pos, __u32 k)
{
	__u8 c = req_at(s, pos);

	if (c == ' ') {
		r->path_end = pos;
		return 1;
	}
	/* user space ignores the query, as nginx does for static files */
	if (r->query) {
		if (in_set(c, QCHAR_LO, QCHAR_HI))
			return 0;
		r->reason = FS_STAT_HANDOFF_TARGET;
		return 1;
	}
	if (c == '?') {
		r->query = 1;
		return 0;
	}
	/* '%' and '#' are outside the set: decoding stays in user space */
	if (!in_set(c, PCHAR_LO, PCHAR_HI) || (r->prev == '/' && (c == '.' || c == '/')) ||
	    k >= FS_PATH_MAX - 1) {
		r->reason = FS_STAT_HANDOFF_TARGET;
		return 1;
	}
	s->key.path[k & (FS_PATH_MAX - 1)] = c;
	r->prev = c;
	return 0;
}

/* SCAN_STRIDE bytes of the path from r->base; returns 1 to stop the loop. */
static long path_step(__u64 i, void *ctx)
{
	struct scratch *s = scratch_get();
	struct http_req *r;
	__u32 k, pos;

	if (!s)
		return 1;
	r = &s->http;
#pragma unroll
	for (k = 0; k < SCAN_STRIDE; k++) {
		pos = r->base + (__u32)i * SCAN_STRIDE + k;
		if (pos >= r->len)
			return 1;
		if (path_byte(s, r, pos, (__u32)i * SCAN_STRIDE + k))
			return 1;
	}
	return 0;
}

static __always_inline int bytes_are(const struct scratch *s, __u32 i, const char *lit, __u32 n)
{
	__u32 k;

	for (k = 0; k < n; k++)
		if (req_at(s, i + k) != lit[k])
			return 0;
	return 1;
}

/*
 * Parse the len bytes of s->req into s->http. Returns 0 when the request is
 * one the fast path answers (then s->key holds the path), else the hand-off
 * reason.
 */
static __always_inline __u32 http_parse(struct scratch *s, __u32 len)
{
	struct http_req *r = &s->http;
	__u32 path_start, nr;

	__builtin_memset(r, 0, sizeof(*r));
	r->len = len;
	if (r->len >= 5 && bytes_are(s, 0, "GET /", 5)) {
		r->method = HTTP_GET;
		path_start = 4;
	} else if (r->len >= 6 && bytes_are(s, 0, "HEAD /", 6)) {
		r->method = HTTP_HEAD;
		path_start = 5;
	} else {
		/* an origin-form target starts with '/': anything else is a method we leave */
		return FS_STAT_HANDOFF_METHOD;
	}

	r->base = path_start;
	nr = r->len - path_start;
	bpf_loop(scan_calls(nr & (FS_REQ_MAX * 2 - 1)), path_step, NULL, 0);
	if (r->reason)
		return r->reason;
	if (!r->path_end)
		return FS_STAT_HANDOFF_PARTIAL;

	if (r->path_end + 11 > r->len)
		return FS_STAT_HANDOFF_PARTIAL;
	if (!bytes_are(s, r->path_end, " HTTP/1.", 8) ||
	    !bytes_are(s, r->path_end + 9, "\r\n", 2))
		return FS_STAT_HANDOFF_VERSION;
	switch (req_at(s, r->path_end + 8)) {
	case '0':
		r->minor = 0;
		break;
	case '1':
		r->minor = 1;
		break;
	default:
		return FS_STAT_HANDOFF_VERSION;
	}

	r->base = r->path_end + 11;
	r->state = ST_LINE_START;
	if (r->base < r->len)
		bpf_loop(r->len - r->base, header_step, NULL, 0);
	if (r->reason)
		return r->reason;
	if (!r->end)
		return FS_STAT_HANDOFF_PARTIAL;
	if (r->end != r->len)
		return FS_STAT_HANDOFF_PIPELINED;
	/* RFC 9112 §3.2: exactly one Host in HTTP/1.1; one with a bad value is 400 in any */
	if (r->hosts ? !host_plain(r) : r->minor == 1)
		return FS_STAT_HANDOFF_HOST;
	if (r->minor == 0 && r->conn == HTTP_CONN_KEEP_ALIVE)
		return FS_STAT_HANDOFF_HTTP10_KEEP_ALIVE;
	return 0;
}

/* HTTP/1.0 (never keep-alive here, see http_parse) gets one answer per connection. */
static __always_inline int http_wants_close(const struct http_req *r)
{
	return r->conn == HTTP_CONN_CLOSE || r->minor == 0;
}

#endif /* __HTTP_BPF_H */
