/* SPDX-License-Identifier: GPL-2.0 */
/*
 * XDP, the first program a received frame meets (before the stack and the TC
 * fast path): it counts frames by protocol and, for TCP to the server port
 * only, applies the per-client policy user space configures
 * (fileserver_ctl/policy.py):
 *  - a deny list of source prefixes (LPM tries): every segment dropped;
 *  - a limit on new connections per second per client: SYNs over the client's
 *    budget dropped, the budget kept as a GCRA schedule (one timestamp);
 * and keeps per-client figures (connections, requests, bytes, last seen).
 * Everything else passes untouched.
 */
#ifndef __XDP_BPF_H
#define __XDP_BPF_H

#include "net.bpf.h"
#include "maps.bpf.h"

#define ETH_P_ARP	0x0806
#define IPPROTO_UDP_NR	17
#define IPPROTO_ICMP_NR	1
#define IPPROTO_ICMPV6_NR 58
#define NEXTHDR_HOP	0
#define NEXTHDR_ROUTING	43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST	60
/* extension headers walked before giving up on finding the TCP header */
#define IPV6_EXT_MAX	4
#define IPV6_FRAG_OFFSET 0xFFF8
/* no IP header to read a protocol from */
#define NO_PROTO	0x100
/* four bytes as they read in network order */
#define WORD(a, b, c, d) ((__u32)(a) << 24 | (__u32)(b) << 16 | (__u32)(c) << 8 | (__u32)(d))

/* IPv4 source prefix -> segments dropped by that entry */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FS_DENY_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fs_deny_v4);
	__type(value, __u64);
} deny_v4 SEC(".maps");

/* IPv6 source prefix -> segments dropped by that entry */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FS_DENY_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fs_deny_v6);
	__type(value, __u64);
} deny_v6 SEC(".maps");

/* client address -> what it sent to the server port and its SYN budget */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FS_CLIENT_ENTRIES);
	__type(key, struct fs_client_key);
	__type(value, struct fs_client);
} client_stats SEC(".maps");

/* [0] -> the SYN rate limit; all zero (no limit) until user space writes it */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fs_xdp_policy);
} xdp_policy SEC(".maps");

/* What the policy needs of a TCP segment to the server port. */
struct xdp_seg {
	struct fs_client_key client;
	__u32 ip_len;			/* IP header + payload bytes */
	__u8 syn;			/* SYN without ACK: a new connection */
	__u8 request;			/* payload starts with an HTTP method */
};

/* The first four payload bytes of a request line, in network order. */
static __always_inline int starts_request(__u32 w)
{
	switch (w) {
	case WORD('G', 'E', 'T', ' '):
	case WORD('H', 'E', 'A', 'D'):
	case WORD('P', 'O', 'S', 'T'):
	case WORD('P', 'U', 'T', ' '):
	case WORD('D', 'E', 'L', 'E'):
	case WORD('O', 'P', 'T', 'I'):
	case WORD('P', 'A', 'T', 'C'):
	case WORD('T', 'R', 'A', 'C'):
	case WORD('C', 'O', 'N', 'N'):
		return 1;
	}
	return 0;
}

/* TCP header at l4: to the server port? Fills s->syn and s->request. */
static __always_inline int xdp_parse_tcp(void *l4, void *data_end, __u16 port, struct xdp_seg *s)
{
	struct tcphdr *tcp = l4;
	__u8 *payload, flags;
	__u32 doff, w;

	if ((void *)(tcp + 1) > data_end)
		return 0;
	if (tcp->dest != bpf_htons(port))
		return 0;
	flags = ((__u8 *)tcp)[13];
	s->syn = (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_SYN;
	doff = tcp->doff * 4;
	payload = l4 + doff;
	if (doff >= sizeof(*tcp) && (void *)(payload + 4) <= data_end) {
		__builtin_memcpy(&w, payload, 4);
		s->request = starts_request(bpf_ntohl(w));
	}
	return 1;
}

/* IPv4: the source and where TCP starts (NULL when there is no L4 header). */
static __always_inline void *xdp_parse_ipv4(struct iphdr *ip, void *data_end, struct xdp_seg *s,
					    __u16 *proto)
{
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return NULL;
	*proto = ip->protocol;
	ihl = ip->ihl * 4;
	/* later fragments carry no ports; the first one does, options or not */
	if (ihl < sizeof(*ip) || (ip->frag_off & bpf_htons(IP_OFFSET)))
		return NULL;
	s->client.family = 4;
	__builtin_memcpy(s->client.addr, &ip->saddr, 4);
	s->ip_len = bpf_ntohs(ip->tot_len);
	return (void *)ip + ihl;
}

/*
 * IPv6: the source and where the transport header starts, past up to
 * IPV6_EXT_MAX extension headers (so a denied client cannot slip past the
 * deny list by adding one).
 */
static __always_inline void *xdp_parse_ipv6(struct ipv6hdr *ip6, void *data_end, struct xdp_seg *s,
					    __u16 *proto)
{
	void *cur = ip6 + 1;
	__u8 nh;
	int i;

	if (cur > data_end)
		return NULL;
	s->client.family = 6;
	__builtin_memcpy(s->client.addr, &ip6->saddr, 16);
	s->ip_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	nh = ip6->nexthdr;
#pragma unroll
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		if (nh == NEXTHDR_FRAGMENT) {
			struct frag_hdr *fh = cur;

			if ((void *)(fh + 1) > data_end)
				break;
			if (fh->frag_off & bpf_htons(IPV6_FRAG_OFFSET)) {
				*proto = fh->nexthdr;
				return NULL;
			}
			nh = fh->nexthdr;
			cur = fh + 1;
		} else if (nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST) {
			struct ipv6_opt_hdr *oh = cur;

			if ((void *)(oh + 1) > data_end)
				break;
			nh = oh->nexthdr;
			cur += (oh->hdrlen + 1) * 8;
		} else {
			break;
		}
	}
	*proto = nh;
	if (nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST ||
	    nh == NEXTHDR_FRAGMENT)
		return NULL;	/* more than IPV6_EXT_MAX, or cut short */
	return cur;
}

static __always_inline void count_l4(__u16 proto)
{
	switch (proto) {
	case IPPROTO_TCP_NR:
		stat_inc(FS_STAT_XDP_TCP);
		break;
	case IPPROTO_UDP_NR:
		stat_inc(FS_STAT_XDP_UDP);
		break;
	case IPPROTO_ICMP_NR:
	case IPPROTO_ICMPV6_NR:
		stat_inc(FS_STAT_XDP_ICMP);
		break;
	default:
		stat_inc(FS_STAT_XDP_OTHER_L4);
	}
}

/* Is the source in the deny list? Counts the drop on the matching entry. */
static __always_inline int denied(const struct xdp_seg *s)
{
	__u64 *drops;

	if (s->client.family == 4) {
		struct fs_deny_v4 k = { .prefixlen = 32 };

		__builtin_memcpy(k.addr, s->client.addr, 4);
		drops = bpf_map_lookup_elem(&deny_v4, &k);
	} else {
		struct fs_deny_v6 k = { .prefixlen = 128 };

		__builtin_memcpy(k.addr, s->client.addr, 16);
		drops = bpf_map_lookup_elem(&deny_v6, &k);
	}
	if (!drops)
		return 0;
	__sync_fetch_and_add(drops, 1);
	return 1;
}

/* The client's entry, new or started afresh when it was idle too long. */
static __always_inline struct fs_client *client_get(const struct fs_client_key *k, __u64 now)
{
	struct fs_client *c = bpf_map_lookup_elem(&client_stats, k);
	struct fs_client fresh = { .first_seen_ns = now, .last_seen_ns = now };

	/* signed: another CPU may have stamped a time later than our now */
	if (c && (__s64)(now - c->last_seen_ns) <= (__s64)FS_CLIENT_IDLE_NS)
		return c;
	if (bpf_map_update_elem(&client_stats, k, &fresh, BPF_ANY))
		return NULL;
	return bpf_map_lookup_elem(&client_stats, k);
}

/*
 * GCRA: the SYN is let through unless the client's schedule already runs more
 * than a burst ahead of now; each SYN let through moves it one interval on.
 * The compare-and-swap keeps two CPUs from spending the same slot.
 */
static __always_inline int syn_allowed(struct fs_client *c, __u64 now)
{
	struct fs_xdp_policy *pol;
	__u32 zero = 0;
	__u64 tat, next;
	int i;

	pol = bpf_map_lookup_elem(&xdp_policy, &zero);
	if (!pol || !pol->syn_interval_ns)
		return 1;
	for (i = 0; i < 2; i++) {
		tat = c->syn_tat_ns;
		next = tat > now ? tat : now;
		if (next - now > pol->syn_burst_ns)
			return 0;
		next += pol->syn_interval_ns;
		if (__sync_val_compare_and_swap(&c->syn_tat_ns, tat, next) == tat)
			return 1;
	}
	return 0;	/* lost the race twice: a flood of SYNs from this client */
}

/* Policy and figures for one segment to the server port. */
static __always_inline int client_policy(const struct xdp_seg *s)
{
	__u64 now = bpf_ktime_get_ns();
	struct fs_client *c;

	if (denied(s)) {
		stat_inc(FS_STAT_XDP_DROP_DENY);
		return XDP_DROP;
	}
	c = client_get(&s->client, now);
	if (!c)
		return XDP_PASS;	/* cannot account for it: not a reason to drop */
	if ((__s64)(now - c->last_seen_ns) > 0)
		c->last_seen_ns = now;
	if (s->syn) {
		if (!syn_allowed(c, now)) {
			__sync_fetch_and_add(&c->dropped, 1);
			stat_inc(FS_STAT_XDP_DROP_SYN_RATE);
			return XDP_DROP;
		}
		__sync_fetch_and_add(&c->connections, 1);
	}
	if (s->request)
		__sync_fetch_and_add(&c->requests, 1);
	__sync_fetch_and_add(&c->bytes, s->ip_len);
	return XDP_PASS;
}

static __always_inline int xdp_filter(struct xdp_md *ctx, __u16 port)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct xdp_seg s = {};
	__u16 proto = NO_PROTO;
	void *l4;

	stat_inc(FS_STAT_XDP_PACKETS);
	if ((void *)(eth + 1) > data_end) {
		stat_inc(FS_STAT_XDP_OTHER_L3);
		return XDP_PASS;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		stat_inc(FS_STAT_XDP_IPV4);
		l4 = xdp_parse_ipv4((void *)(eth + 1), data_end, &s, &proto);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		stat_inc(FS_STAT_XDP_IPV6);
		l4 = xdp_parse_ipv6((void *)(eth + 1), data_end, &s, &proto);
	} else {
		stat_inc(eth->h_proto == bpf_htons(ETH_P_ARP) ? FS_STAT_XDP_ARP : FS_STAT_XDP_OTHER_L3);
		return XDP_PASS;
	}
	if (proto == NO_PROTO)
		return XDP_PASS;	/* IP header cut short */
	count_l4(proto);
	if (!l4 || proto != IPPROTO_TCP_NR || !xdp_parse_tcp(l4, data_end, port, &s))
		return XDP_PASS;
	stat_inc(FS_STAT_XDP_TO_PORT);
	return client_policy(&s);
}

#endif /* __XDP_BPF_H */
