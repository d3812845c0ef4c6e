/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The per-CPU work area. It also holds the state of the bpf_loop scans: kept
 * in a map value rather than on the stack, the verifier sees it as unknown and
 * checks each callback once instead of once per combination of values.
 */
#ifndef __SCRATCH_BPF_H
#define __SCRATCH_BPF_H

#include "fileserver.h"
#include "net.bpf.h"

#define TCP_OPT_SPACE	40
#define NO_WSCALE	0xff

/* What the program needs of one TCP segment to the server port (parse.bpf.h). */
struct pkt {
	struct fs_tuple tuple;		/* client = source */
	__u8 mac_client[ETH_ALEN];
	__u8 mac_server[ETH_ALEN];
	__u32 l4_off;
	__u32 payload_off;
	__u32 payload_len;
	__u32 seq;
	__u32 ack_seq;
	__u32 tsval;
	__u32 tsecr;
	__u16 window;
	__u16 mss;			/* MSS option, 0 when absent */
	__u8 family;
	__u8 flags;			/* TCP flags byte */
	__u8 ip_ecn;			/* ECN bits of the IP header */
	__u8 has_ts;
	__u8 wscale;			/* window scale option, NO_WSCALE when absent */
	__u8 sack_ok;
	__u8 has_sack;			/* SACK blocks: data arrived out of order */
	__u8 bad_opts;			/* malformed option list */
	__u32 sack_high;		/* highest right edge of those blocks */
	__u32 sack_start[4];		/* the blocks as sent, most recent first */
	__u32 sack_end[4];
	__u32 sack_count;
};

/* bpf_loop state for a TCP option list copied out of the packet */
struct opt_walk {
	__u8 opts[64];			/* index masked with 63: room beyond the 40 bytes */
	__u32 len;
	__u32 pos;
	__u32 tsval;
	__u32 tsecr;
	__u32 sack_high;
	__u32 sack_start[4];
	__u32 sack_end[4];
	__u32 sack_count;
	__u16 mss;
	__u8 wscale;
	__u8 sack_ok;
	__u8 has_ts;
	__u8 has_sack;
	__u8 bad;
};

enum http_method {
	HTTP_GET = 1,
	HTTP_HEAD,
};

enum http_conn {
	HTTP_CONN_DEFAULT,
	HTTP_CONN_CLOSE,
	HTTP_CONN_KEEP_ALIVE,
};

enum http_hdr {
	H_OTHER,
	H_HOST,
	H_CONNECTION,
	H_IF_NONE_MATCH,
	H_IF_MODIFIED_SINCE,
	H_CONDITIONAL,			/* If-Match, If-Unmodified-Since */
	H_RANGE,			/* Range, If-Range */
	H_BODY,				/* Content-Length, Transfer-Encoding, Expect */
	H_UPGRADE,
	H_ACCEPT_ENCODING,
	H_CONTENT_RANGE,		/* user space says 400 when repeated */
};

enum http_state {
	ST_LINE_START,
	ST_NAME,
	ST_OWS,
	ST_VALUE,
	ST_LF,
	ST_END_LF,
};

/* Parse results plus the bpf_loop state of the header scan. */
struct http_req {
	__u32 len;			/* request bytes in scratch.req */
	__u32 base;			/* offset the current bpf_loop started at */
	__u32 path_end;			/* offset of the space after the path */
	__u32 end;			/* offset just past the empty line, 0 until seen */
	__u32 reason;			/* FS_STAT_HANDOFF_*, 0 while acceptable */
	__u32 name_start;
	__u32 value_start;
	__u32 value_end;
	__u32 skip;			/* bytes the header scan jumped over */
	__u32 fields;			/* header lines so far */
	__u32 host_start;		/* the Host value, without leading OWS */
	__u32 host_end;
	__u16 inm_off;			/* If-None-Match value */
	__u16 inm_len;
	__u8 method;
	__u8 minor;			/* HTTP/1.minor */
	__u8 conn;			/* enum http_conn */
	__u8 hosts;
	__u8 has_inm;
	__u8 has_ims;
	__u8 accept_encoding;
	__u8 state;
	__u8 hdr;
	__u8 prev;
	__u8 query;			/* inside the query part of the target */
	__u8 host_state;		/* enum host_state (http.bpf.h) */
	__u8 host_prev;			/* the byte before, for ".." */
};

/* Headers of a segment we send, built here and written with one store. The pad
 * puts the IP header on a 4-byte boundary. */
struct reply_hdr {
	__u8 pad[2];
	struct ethhdr eth;
	union {
		struct {
			struct iphdr ip;
			struct tcphdr tcp;
			__u8 opts[20];
		} v4;
		struct {
			struct ipv6hdr ip;
			struct tcphdr tcp;
			__u8 opts[20];
		} v6;
	};
};

#define REQ_MASK (FS_REQ_MAX - 1)
/* stream.bpf.h copies a chunk's upper part here; room for its largest offset + length */
#define STREAM_STAGE (FS_CHUNK_SIZE + 8)

/* Per-CPU work area: too big for the 512-byte stack. */
struct scratch {
	__u8 req[FS_REQ_MAX + 64];	/* the request; reads past len stay in bounds */
	struct fs_path_key key;		/* its path, NUL padded: the file_cache key */
	struct reply_hdr hdr;
	struct http_req http;
	struct opt_walk opts;
	struct pkt pkt;			/* the packet at hand (kept off the 512-byte stack) */
	/* a new conn_track value is built here: struct fs_conn holds a bpf_timer,
	 * which may not sit in a per-CPU map, so it is plain bytes here */
	__u8 conn_new[sizeof(struct fs_conn)] __attribute__((aligned(8)));
	__u8 stage[STREAM_STAGE] __attribute__((aligned(8)));
};

/* [0] -> this CPU's struct scratch */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

static __always_inline struct scratch *scratch_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&scratch, &zero);
}

#endif /* __SCRATCH_BPF_H */
