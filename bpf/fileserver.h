/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ABI shared by the BPF programs and the Python control plane.
 *
 * Parsed by cffi's cdef (fileserver_ctl/libbpf.py: Abi): only integer #defines,
 * enums and structs of fixed-width types belong here.
 */
#ifndef __FILESERVER_H
#define __FILESERVER_H

#define FS_ABI_VERSION 6

/*
 * file_cache key: the request path as sent ("/a/b.html"), NUL padded. A power of two
 * (the parser masks with it); a longer path is handed off (FS_STAT_HANDOFF_TARGET) and
 * its file is not cached. Every request hashes and compares the whole key, and every
 * entry carries it: 64 bytes make an element of 200 (a 256-byte allocation).
 */
#define FS_PATH_MAX 64
/* a status line + headers (keep-alive form, ends with an empty line) */
#define FS_HEAD_MAX 384
/*
 * The 304 head is not stored: the program builds it from the 200 head (see struct
 * fs_entry) after this status line, "HTTP/1.1 304 Not Modified\r\n" (bpf/segment.bpf.h).
 */
#define FS_304_STATUS_LEN 27
#define FS_304_SLICES 3
/* the Date value is always an IMF-fixdate of 29 bytes; its slot is padded to 32 */
#define FS_DATE_LEN 29
#define FS_DATE_SLOT 32
/*
 * A file version lives as one byte stream, the 200 head then the body, cut into
 * chunks of this size, so its memory follows the file's size. One file_data element
 * is the kernel's struct htab_elem (48 bytes), the key (16), the chunk and
 * bpf_mem_alloc's list node (8): 2,048 bytes, exactly a kmalloc size class.
 */
#define FS_CHUNK_SIZE 1976
/*
 * The stream's last chunk, when shorter, lives in the smallest tail map whose
 * element holds it (file_tail_<cap>, value struct fs_tail_<cap>), keyed like
 * file_data; longer than the largest cap, it is a file_data chunk too. The first
 * three make elements of exactly 256, 512 and 1,024 bytes (kmalloc size classes);
 * the others follow FS_CHUNK_SIZE in eighths. Chunk 0 (a stream shorter than a
 * chunk) goes in a map of at least FS_HEAD_ROOM bytes: the program reads the head
 * from there in one fixed-size copy. See bpf/stream.bpf.h: stream_tail_class().
 */
#define FS_TAIL_CLASSES 6
#define FS_TAIL_CAP_1 184
#define FS_TAIL_CAP_2 440
#define FS_TAIL_CAP_3 952
#define FS_TAIL_CAP_4 1232
#define FS_TAIL_CAP_5 1480
#define FS_TAIL_CAP_6 1728
#define FS_HEAD_ROOM 392		/* FS_HEAD_MAX + 8 */
/* largest body the kernel path answers (as many segments as it takes) */
#define FS_BODY_MAX 262144
/* most TCP payload one skb can carry after bpf_skb_change_tail (with timestamps) */
#define FS_SEGMENT_MAX 15998
/* longest request the program parses; longer ones are handed off */
#define FS_REQ_MAX 2048

#define FS_CACHE_ENTRIES 8192
#define FS_TAIL_ENTRIES 8192		/* per tail map: one tail per version */
#define FS_INODE_ENTRIES 16384
#define FS_DATA_CHUNKS 65536
#define FS_CONN_ENTRIES 65536
/* an owned connection silent for this long is forgotten (its entry is reused) */
#define FS_CONN_IDLE_NS 120000000000

/*
 * Answers longer than one segment (bpf/sender.bpf.h): sent within the client's
 * window and a congestion window (RFC 5681, initial window RFC 6928), resent
 * after duplicate ACKs (RFC 6582, 3042, 5827), a tail loss probe (RFC 8985) or
 * when the retransmission timer (RFC 6298) expires.
 */
#define FS_IW_SEGMENTS 10		/* initial window, segments (RFC 6928) */
#define FS_RTO_INIT_MS 1000		/* before any RTT sample (RFC 6298 2.1) */
#define FS_RTO_MIN_MS 200		/* Linux's floor, not RFC 6298's 1 s */
#define FS_RTO_MAX_MS 60000
#define FS_RTO_TRIES 8			/* timeouts in a row before the connection is reset */
#define FS_PTO_EXTRA_MS 2		/* tail loss probe after 2 * SRTT + this (as Linux), */
#define FS_PTO_MIN_MS 5		/* ... at least this: see conn_timer_restart */
#define FS_ACK_DELAY_MS 200		/* ... + the client's delayed ACK when one segment is out */
#define FS_WATCHDOG_MS 1000		/* work out, client silent: a kick even without the timer */
#define FS_BURST_MAX 16			/* segments one packet of the client may release */
#define FS_DATA_PATHS 16384		/* data_paths entries: file versions being sent */
/*
 * skb->mark of a kick: a bpf_timer callback cannot send, so it asks user space
 * (fileserver_ctl/retransmit.py) to run the TC program on a dummy packet of the
 * connection with BPF_PROG_TEST_RUN; the program sends from there with
 * bpf_clone_redirect.
 */
#define FS_KICK_MARK 0x6b69636b

/* Counters of the per-CPU array `stats`; user space names them from this enum. */
enum fs_stat {
	FS_STAT_PACKETS,		/* TCP packets to the server port seen by TC */
	FS_STAT_XDP_PACKETS,		/* packets seen by the XDP program */
	FS_STAT_SYN_ANSWERED,		/* SYN-ACKs sent with a cookie */
	FS_STAT_SYN_PASSED,		/* SYNs left to the kernel (syncookies off, odd headers) */
	FS_STAT_HANDSHAKES,		/* handshake ACKs whose cookie validated */
	FS_STAT_COOKIE_FAILURES,	/* non-SYN packets without entry and with a bad cookie */
	FS_STAT_RESPONSES,		/* responses sent by the kernel path */
	FS_STAT_RESPONSE_BYTES,		/* their TCP payload bytes */
	FS_STAT_NOT_MODIFIED,		/* of which 304 */
	FS_STAT_HEAD_REQUESTS,		/* of which answers to HEAD */
	FS_STAT_RETRANSMITS,		/* retransmitted requests answered again */
	FS_STAT_ACKS,			/* pure ACKs of our data consumed */
	FS_STAT_FINS,			/* FINs received on owned connections */
	FS_STAT_RSTS,			/* RSTs received on owned connections */
	FS_STAT_CLOSED,			/* owned connections closed cleanly */
	FS_STAT_DROPPED,		/* segments dropped (out of order, unacked data) */
	FS_STAT_ERRORS,			/* helper failures while building an answer */
	FS_STAT_SEGMENTS,		/* data segments sent (first transmissions and resends) */
	FS_STAT_MULTI_SEGMENT,		/* answers longer than one segment (or the window) */
	FS_STAT_RETRANSMIT_FAST,	/* segments resent after 3 duplicate ACKs or a partial ACK */
	FS_STAT_RETRANSMIT_TIMEOUT,	/* segments resent after the retransmission timer expired */
	FS_STAT_TAIL_PROBES,		/* tail loss probes sent (RFC 8985) */
	FS_STAT_RECOVERY_PROBES,	/* holes resent again when fast recovery went quiet */
	FS_STAT_WINDOW_STALLS,		/* sending stopped by the client's receive window */
	FS_STAT_WINDOW_PROBES,		/* zero-window probes sent */
	FS_STAT_RTO_EXPIRIES,		/* retransmission timer expiries */
	FS_STAT_RTO_RESETS,		/* connections reset after FS_RTO_TRIES timeouts in a row */
	FS_STAT_KICKS,			/* timer kicks user space ran through the program */
	FS_STAT_WATCHDOG_KICKS,		/* of which for a silent connection whose timer work was lost */
	FS_STAT_INVALIDATIONS,		/* cached files whose inode changed (ctime), seen in kernel */
	FS_STAT_PASSED,			/* packets of handed-off connections passed on */
	FS_STAT_HANDOFF_MISS,		/* path not in file_cache */
	FS_STAT_HANDOFF_STALE,		/* in file_cache, but its file changed since */
	FS_STAT_HANDOFF_METHOD,		/* not GET or HEAD with an origin-form target */
	FS_STAT_HANDOFF_VERSION,	/* not HTTP/1.0 or HTTP/1.1 */
	FS_STAT_HANDOFF_TARGET,		/* '%', '#', '/.', '//', too long, odd characters */
	FS_STAT_HANDOFF_HEADER,		/* a header the kernel path does not handle */
	FS_STAT_HANDOFF_CONDITIONAL,	/* If-Modified-Since, If-Match, non-matching If-None-Match */
	FS_STAT_HANDOFF_RANGE,		/* Range or If-Range */
	FS_STAT_HANDOFF_BODY,		/* Content-Length, Transfer-Encoding, Expect */
	FS_STAT_HANDOFF_PARTIAL,	/* request not complete in this segment */
	FS_STAT_HANDOFF_PIPELINED,	/* more bytes after the first request */
	FS_STAT_HANDOFF_TOO_LARGE,	/* body over FS_BODY_MAX, or a segment under the head */
	FS_STAT_HANDOFF_REQUEST_SIZE,	/* request longer than FS_REQ_MAX */
	FS_STAT_HANDOFF_OTHER,		/* anything else unusual (IP options, urgent data, no Date yet) */
	FS_STAT_HANDOFF_FAILED,		/* no listener or the kfunc refused: the kernel resets */
	/* XDP (bpf/xdp.bpf.h): frames by protocol, then the per-client policy */
	FS_STAT_XDP_IPV4,		/* IPv4 frames */
	FS_STAT_XDP_IPV6,		/* IPv6 frames */
	FS_STAT_XDP_ARP,		/* ARP frames */
	FS_STAT_XDP_OTHER_L3,		/* any other EtherType (VLAN-tagged included), runts */
	FS_STAT_XDP_TCP,		/* TCP in IPv4 or IPv6 */
	FS_STAT_XDP_UDP,		/* UDP in IPv4 or IPv6 */
	FS_STAT_XDP_ICMP,		/* ICMP and ICMPv6 */
	FS_STAT_XDP_OTHER_L4,		/* other IP protocols, unparsed IPv6 extension headers */
	FS_STAT_XDP_TO_PORT,		/* TCP segments to the server port (the policy's input) */
	FS_STAT_XDP_DROP_DENY,		/* dropped: source address in the deny list */
	FS_STAT_XDP_DROP_SYN_RATE,	/* dropped: SYN over the client's connection rate */
	FS_STAT_SYN_HELD,		/* of SYN_PASSED: a kernel socket holds the tuple (TIME_WAIT...) */
	FS_STAT_HANDOFF_HOST,		/* Host missing in 1.1, repeated, or not plainly host[:port] */
	FS_STAT_HANDOFF_HTTP10_KEEP_ALIVE, /* HTTP/1.0 with Connection: keep-alive (kept open) */
	/* the per-connection lock (bpf/conn_lock.bpf.h) */
	FS_STAT_LOCK_WAITS,		/* runs that found their connection busy on another CPU */
	FS_STAT_LOCK_TIMEOUTS,		/* ... and gave up waiting: the packet was dropped */
	FS_STAT_VERSION_GONE,		/* answers cut short (reset): the cached version they were
					 * made from was replaced while they were being sent */
	FS_STAT_TIMER_FAILURES,		/* timer starts that found no timer of the connection's
					 * own (the kernel had no memory for it): the sweeper
					 * times it */
	FS_STAT_KICKS_QUEUED_LATER,	/* ... or user space, when there is no sweeper */
	FS_STAT_KICKS_LATER,		/* kicks of those that found the client silent: expiries */
	FS_STAT_MAX,
};

/* The payload variants whose checksums an entry carries. */
enum fs_resp {
	FS_RESP_GET,
	FS_RESP_GET_CLOSE,
	FS_RESP_HEAD,
	FS_RESP_HEAD_CLOSE,
	FS_RESP_304,
	FS_RESP_304_CLOSE,
	FS_RESP_MAX,
};

enum fs_entry_flags {
	FS_ENTRY_F_ENCODED = 1,		/* user space may answer another encoding: hand off
					 * requests that carry Accept-Encoding */
	FS_ENTRY_F_NO_304 = 2,		/* the 304 head is not slices of the 200 head: hand
					 * off requests that carry If-None-Match */
};

struct fs_path_key {
	char path[FS_PATH_MAX];		/* char: bpftool prints it as a string */
};

/*
 * file_cache value: where one path's file version is and what its answers sum to.
 * The 200 head starts its stream (see FS_CHUNK_SIZE) and lies in chunk 0; the body
 * follows it. The 304 head is the FS_304_STATUS_LEN-byte status line, then
 * s304_len[i] bytes of the 200 head at s304_off[i] for each slice i; the Date lies in
 * slice 0. User space checks the result equals its own 304 head, or sets
 * FS_ENTRY_F_NO_304. csum[v] is the ones'-complement sum of payload variant v (head,
 * then the body for GET) with zero bytes in place of the Date value: the program adds
 * the sum of the Date it sends (http_date). Folded to 16 bits in the byte order
 * csum_partial() gives on a little-endian host (the sum of little-endian 16-bit words).
 * The *_CLOSE variants are the head with "Connection: close\r\n" inserted before
 * the final CRLF, which the kernel writes itself.
 */
struct fs_entry {
	__u64 data_id;			/* file_data key prefix of this version's stream */
	__u64 ino;			/* the file's inode, checked in cached_inodes (0: unchecked) */
	__u32 dev;			/* its device as the kernel has it: major << 20 | minor */
	__u32 body_len;
	__u16 flags;			/* enum fs_entry_flags */
	__u16 head_len;			/* 200 head, ends with "\r\n\r\n"; the body follows it */
	__u16 date_off;			/* offset of the Date value in the 200 head */
	__u16 etag_off;			/* offset of the ETag value (quotes included) in the 200 head */
	__u16 etag_len;
	__u16 s304_off[FS_304_SLICES];	/* the 304 head's slices of the 200 head */
	__u16 s304_len[FS_304_SLICES];
	__u32 csum[FS_RESP_MAX];
	/* answers sent from this entry (kernel adds); last, away from what every answer reads */
	__u64 hits;
};

/* file_data (and file_tail_*): the chunk of a version's stream at offset index * FS_CHUNK_SIZE */
struct fs_data_key {
	__u64 data_id;			/* a hash of the file version: same version, same id */
	__u32 index;
	__u32 pad;
};

struct fs_chunk {
	__u8 data[FS_CHUNK_SIZE];
};

/* file_tail_<cap>: a stream's last chunk, zero padded (see FS_TAIL_CLASSES) */
struct fs_tail_184 {
	__u8 data[FS_TAIL_CAP_1];
};

struct fs_tail_440 {
	__u8 data[FS_TAIL_CAP_2];
};

struct fs_tail_952 {
	__u8 data[FS_TAIL_CAP_3];
};

struct fs_tail_1232 {
	__u8 data[FS_TAIL_CAP_4];
};

struct fs_tail_1480 {
	__u8 data[FS_TAIL_CAP_5];
};

struct fs_tail_1728 {
	__u8 data[FS_TAIL_CAP_6];
};

/*
 * cached_inodes key: an inode whose file is cached. The kernel deletes the key
 * the moment the inode's ctime changes (write, truncate, rename over it, unlink,
 * chmod, utime), and an entry whose key is gone is not answered any more.
 */
struct fs_inode_key {
	__u64 ino;
	__u32 dev;
	__u32 pad;
};

/*
 * http_date[0]: the current Date value, refreshed by user space every second, with
 * its sum (as fs_entry.csum, of the whole slot) so that answers only add it.
 */
struct fs_date {
	char value[FS_DATE_SLOT];
	__u32 sum;
	__u32 pad;
};

/* conn_track key: the client's address and port first; IPv4 uses word 0 */
struct fs_tuple {
	__u32 client_addr[4];
	__u32 server_addr[4];
	__u16 client_port;		/* network byte order */
	__u16 server_port;		/* network byte order */
	__u8 family;			/* 4 or 6 */
	__u8 pad[3];
};

enum fs_conn_state {
	FS_CONN_OPEN = 1,		/* owned by the program */
	FS_CONN_FIN_SENT,		/* our FIN is out, waiting for the client's */
	FS_CONN_HANDED_OFF,		/* belongs to a kernel socket: pass everything */
};

enum fs_conn_flags {
	FS_CONN_F_SACK = 1,
	FS_CONN_F_TSTAMP = 2,
	FS_CONN_F_WSCALE = 4,
	FS_CONN_F_ECN = 8,
	FS_CONN_F_FIN_RCVD = 16,
	FS_CONN_F_ECE = 32,		/* CE seen: echo ECE until the client sends CWR */
};

/* What the sender of a connection has to do (struct fs_conn.tx_flags). */
enum fs_tx_flags {
	FS_TX_F_FIN = 1,		/* the answer ends with our FIN */
	FS_TX_F_RECOVERY = 2,		/* fast recovery until snd_una reaches recover */
	FS_TX_F_LOSS = 4,		/* after a timeout: resending from snd_una */
	FS_TX_F_RESEND = 8,		/* the segment at snd_una goes out again now */
	FS_TX_F_PROBE = 16,		/* a zero-window probe is due */
	FS_TX_F_RESET = 32,		/* too many timeouts: reset the connection */
	FS_TX_F_RTT = 64,		/* srtt8/rttvar4 hold a sample */
	FS_TX_F_TIMER = 128,		/* rto_timer is initialised (cleared when a start fails) */
	FS_TX_F_TLP_DUE = 256,		/* a tail loss probe goes out now (RFC 8985) */
	FS_TX_F_TLP_DONE = 512,		/* ... and went out since snd_una last moved */
	FS_TX_F_ONE = 1024,		/* the answer went out whole with its request: the
					 * client's retransmitted request recovers it */
};

/* Same layout as the kernel's struct bpf_timer (the program's BTF names it so). */
struct bpf_timer {
	__u64 __opaque[2];
};

/* conn_track value; sequence numbers in host byte order */
struct fs_conn {
	__u64 last_seen_ns;
	__u32 rcv_nxt;			/* next client sequence number expected */
	__u32 snd_nxt;			/* our next sequence number */
	__u32 snd_una;			/* highest ACK received from the client */
	__u32 req_seq;			/* client sequence number of the last request answered */
	__u32 resp_seq;			/* our sequence number its answer started at */
	__u32 ts_recent;		/* the client's last TSval, echoed back */
	__u32 snd_wnd;			/* the client's window in bytes */
	__u16 req_len;			/* length of the last request answered */
	__u16 mss;			/* the client's MSS (from the cookie's table) */
	__u8 snd_wscale;		/* the client's window scale */
	__u8 rcv_wscale;		/* ours */
	__u8 flags;			/* enum fs_conn_flags */
	__u8 state;			/* enum fs_conn_state */
	__u32 ifindex;			/* device the connection came in on */
	/* the answer being sent: any of its segments is made again from these */
	__u64 data_id;			/* its body in file_data (data_paths: the path) */
	__u32 resp_len;			/* its payload bytes, head and body */
	__u32 snd_end;			/* sequence number after it (and its FIN) */
	__u32 tx_next;			/* next sequence number to send (after a timeout,
					 * back at snd_una) */
	__u16 resp_head;		/* its head bytes ("Connection: close" included) */
	__u16 seg_size;			/* payload bytes per segment: MSS less options */
	__u16 tx_flags;			/* enum fs_tx_flags */
	__u8 resp_variant;		/* enum fs_resp */
	__u8 dupacks;			/* duplicate ACKs in a row */
	__u8 retries;			/* timeouts (or unanswered probes) in a row */
	__u8 tail0;			/* tail class of its stream's chunk 0 (0: in file_data) */
	__u16 resp_body;		/* stream offset of its body in file_data */
	/* congestion control and retransmission timer, RFC 5681/6582/6298 */
	__u32 cwnd;			/* bytes */
	__u32 ssthresh;
	__u32 recover;			/* snd_nxt when loss recovery began */
	__u32 resent_nxt;		/* snd_nxt as the last resend went out */
	__u32 srtt8;			/* smoothed RTT, ms << 3 */
	__u32 rttvar4;			/* RTT variation, ms << 2 */
	__u32 rto_ms;
	__u8 mac_client[6];
	__u8 mac_server[6];
	char date[FS_DATE_SLOT];	/* the Date the answer's head went out with */
	struct bpf_timer rto_timer;	/* retransmission and zero-window probe timer */
};

enum fs_event_type {
	FS_EVENT_HANDOFF = 1,		/* a request went to user space; reason = enum fs_stat */
	FS_EVENT_RESPONSE = 2,		/* the kernel answered (only with log_responses set) */
};

/* events ring buffer record */
struct fs_event {
	__u32 type;			/* enum fs_event_type */
	__u32 reason;			/* FS_EVENT_HANDOFF: the FS_STAT_HANDOFF_* counter */
	struct fs_path_key key;		/* the request path when known */
	__u64 ts_ns;			/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 client_addr[4];		/* as in struct fs_tuple */
	__u16 client_port;		/* network byte order */
	__u16 status;			/* FS_EVENT_RESPONSE: 200 or 304 */
	__u32 body_bytes;		/* body bytes sent (0 for HEAD and 304) */
	__u8 family;			/* 4 or 6 */
	__u8 method;			/* 1 GET, 2 HEAD, 0 unknown */
	__u8 http_minor;		/* HTTP/1.minor */
	__u8 pad;
};

/* XDP per-client policy (bpf/xdp.bpf.h, fileserver_ctl/policy.py) */
#define FS_DENY_ENTRIES 16384
#define FS_CLIENT_ENTRIES 65536
/* a client silent for this long starts afresh: figures and SYN budget reset */
#define FS_CLIENT_IDLE_NS 300000000000

/* deny_v4 / deny_v6 keys (LPM trie): prefix length, then the address in network order */
struct fs_deny_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct fs_deny_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* client_stats key: one client address; IPv4 uses the first 4 bytes */
struct fs_client_key {
	__u8 addr[16];
	__u8 family;			/* 4 or 6 */
	__u8 pad[3];
};

/* client_stats value: what one client sent to the server port, and its SYN budget */
struct fs_client {
	__u64 first_seen_ns;		/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 last_seen_ns;
	__u64 connections;		/* SYNs let through */
	__u64 requests;			/* segments that start with an HTTP method */
	__u64 bytes;			/* IP bytes received from the client */
	__u64 dropped;			/* packets dropped by the SYN rate limit */
	__u64 syn_tat_ns;		/* SYN rate (GCRA): when the budget is whole again */
};

/* xdp_policy[0]: the SYN rate limit, written by user space */
struct fs_xdp_policy {
	__u64 syn_interval_ns;		/* 1 s / rate; 0: no limit */
	__u64 syn_burst_ns;		/* (rate - 1) * interval: a full second's worth at once */
};

#endif /* __FILESERVER_H */
