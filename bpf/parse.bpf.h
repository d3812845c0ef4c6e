/* SPDX-License-Identifier: GPL-2.0 */
/* Ethernet / IPv4 / IPv6 / TCP header parsing into a struct pkt. */
#ifndef __PARSE_BPF_H
#define __PARSE_BPF_H

#include "net.bpf.h"
#include "fileserver.h"
#include "scratch.bpf.h"

enum parse_verdict {
	PARSE_OURS,			/* a TCP segment to the server port */
	PARSE_OTHER,			/* anything else: leave it alone */
};

static __always_inline __u32 opt_be32(const __u8 *b)
{
	return (__u32)b[0] << 24 | (__u32)b[1] << 16 | (__u32)b[2] << 8 | b[3];
}

/* byte i of a walked option list; the mask keeps the verifier's bounds */
static __always_inline __u8 opt_at(const struct opt_walk *w, __u32 i)
{
	return w->opts[i & 63];
}

static __always_inline __u32 opt_be32_at(const struct opt_walk *w, __u32 i)
{
	return (__u32)opt_at(w, i) << 24 | (__u32)opt_at(w, i + 1) << 16 |
	       (__u32)opt_at(w, i + 2) << 8 | opt_at(w, i + 3);
}

/* SACK blocks (left, right edge pairs): each, and the highest right edge. */
static __always_inline void sack_blocks(struct opt_walk *w, __u32 pos, __u8 len)
{
	__u32 k, right;

	for (k = 0; k < 4; k++) {
		if (2 + 8 * (k + 1) > len)
			break;
		right = opt_be32_at(w, pos + 2 + 8 * k + 4);
		w->sack_start[k] = opt_be32_at(w, pos + 2 + 8 * k);
		w->sack_end[k] = right;
		w->sack_count = k + 1;
		if (!w->has_sack || (__s32)(right - w->sack_high) > 0)
			w->sack_high = right;
		w->has_sack = 1;
	}
}

static long opt_step(__u64 i, void *ctx)
{
	struct scratch *s = scratch_get();
	struct opt_walk *w;
	__u32 pos;
	__u8 kind, len;

	if (!s)
		return 1;
	w = &s->opts;
	pos = w->pos;
	if (pos >= w->len || pos >= TCP_OPT_SPACE)
		return 1;
	kind = opt_at(w, pos);
	if (kind == TCPOPT_EOL)
		return 1;
	if (kind == TCPOPT_NOP) {
		w->pos = pos + 1;
		return 0;
	}
	len = opt_at(w, pos + 1);
	if (len < 2 || pos + len > w->len) {
		w->bad = 1;
		return 1;
	}
	if (kind == TCPOPT_MSS && len == 4)
		w->mss = (__u16)opt_at(w, pos + 2) << 8 | opt_at(w, pos + 3);
	else if (kind == TCPOPT_WINDOW && len == 3)
		w->wscale = opt_at(w, pos + 2);
	else if (kind == TCPOPT_SACK_PERM && len == 2)
		w->sack_ok = 1;
	else if (kind == TCPOPT_SACK && len >= 10)
		sack_blocks(w, pos, len);
	else if (kind == TCPOPT_TIMESTAMP && len == 10) {
		w->has_ts = 1;
		w->tsval = opt_be32_at(w, pos + 2);
		w->tsecr = opt_be32_at(w, pos + 6);
	}
	w->pos = pos + len;
	return 0;
}

static __always_inline void parse_tcp_options(struct __sk_buff *skb, struct pkt *p, __u32 optlen)
{
	struct scratch *s = scratch_get();
	struct opt_walk *w;

	p->wscale = NO_WSCALE;
	if (optlen == 0 || optlen > TCP_OPT_SPACE)
		return;
	if (!s)
		goto bad;
	w = &s->opts;
	if (bpf_skb_load_bytes(skb, p->l4_off + sizeof(struct tcphdr), w->opts, optlen))
		goto bad;
	/* Data segments of Linux and most stacks: NOP NOP TS */
	if (optlen == 12 && w->opts[0] == TCPOPT_NOP && w->opts[1] == TCPOPT_NOP &&
	    w->opts[2] == TCPOPT_TIMESTAMP && w->opts[3] == 10) {
		p->has_ts = 1;
		p->tsval = opt_be32(&w->opts[4]);
		p->tsecr = opt_be32(&w->opts[8]);
		return;
	}
	w->len = optlen;
	w->pos = 0;
	w->mss = 0;
	w->wscale = NO_WSCALE;
	w->sack_ok = 0;
	w->has_ts = 0;
	w->has_sack = 0;
	w->sack_count = 0;
	w->bad = 0;
	bpf_loop(TCP_OPT_SPACE, opt_step, NULL, 0);
	p->mss = w->mss;
	p->wscale = w->wscale;
	p->sack_ok = w->sack_ok;
	p->has_ts = w->has_ts;
	p->has_sack = w->has_sack;
	p->sack_high = w->sack_high;
	if (w->has_sack) {
		__builtin_memcpy(p->sack_start, w->sack_start, sizeof(p->sack_start));
		__builtin_memcpy(p->sack_end, w->sack_end, sizeof(p->sack_end));
		p->sack_count = w->sack_count;
	}
	p->tsval = w->tsval;
	p->tsecr = w->tsecr;
	p->bad_opts = w->bad;
	return;
bad:
	p->bad_opts = 1;
}

static __always_inline int parse_tcp(struct __sk_buff *skb, struct pkt *p, struct tcphdr *tcp,
				     void *data_end, __u32 l4_len, __u16 port)
{
	__u32 doff;

	if ((void *)(tcp + 1) > data_end)
		return PARSE_OTHER;
	if (tcp->dest != bpf_htons(port))
		return PARSE_OTHER;
	doff = tcp->doff * 4;
	if (doff < sizeof(*tcp) || doff > l4_len)
		return PARSE_OTHER;
	p->tuple.client_port = tcp->source;
	p->tuple.server_port = tcp->dest;
	p->seq = bpf_ntohl(tcp->seq);
	p->ack_seq = bpf_ntohl(tcp->ack_seq);
	p->window = bpf_ntohs(tcp->window);
	p->flags = ((__u8 *)tcp)[13];
	p->payload_off = p->l4_off + doff;
	p->payload_len = l4_len - doff;
	parse_tcp_options(skb, p, doff - sizeof(*tcp));
	return PARSE_OURS;
}

/*
 * Fill p from an Ethernet frame carrying TCP to `port`. Headers are read from
 * the linear area (pulled in when the stack left them in fragments); the
 * payload is left where it is.
 */
static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt *p, __u16 port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 need = sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr);

	if (data + need > data_end && skb->len >= need) {
		if (bpf_skb_pull_data(skb, need))
			return PARSE_OTHER;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
	}
	if ((void *)(eth + 1) > data_end)
		return PARSE_OTHER;
	__builtin_memcpy(p->mac_client, eth->h_source, ETH_ALEN);
	__builtin_memcpy(p->mac_server, eth->h_dest, ETH_ALEN);

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 tot;

		if ((void *)(ip + 1) > data_end)
			return PARSE_OTHER;
		/* IP options and fragments are rare enough to leave to the kernel */
		if (ip->protocol != IPPROTO_TCP_NR || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
			return PARSE_OTHER;
		tot = bpf_ntohs(ip->tot_len);
		if (tot < sizeof(*ip) + sizeof(struct tcphdr) || tot + sizeof(*eth) > skb->len)
			return PARSE_OTHER;
		p->family = 4;
		p->tuple.family = 4;
		p->tuple.client_addr[0] = ip->saddr;
		p->tuple.server_addr[0] = ip->daddr;
		p->ip_ecn = ip->tos & IP_ECN_MASK;
		p->l4_off = sizeof(*eth) + sizeof(*ip);
		return parse_tcp(skb, p, (void *)(ip + 1), data_end, tot - sizeof(*ip), port);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		__u32 plen;

		if ((void *)(ip6 + 1) > data_end)
			return PARSE_OTHER;
		/* extension headers: leave to the kernel */
		if (ip6->nexthdr != IPPROTO_TCP_NR)
			return PARSE_OTHER;
		plen = bpf_ntohs(ip6->payload_len);
		if (plen < sizeof(struct tcphdr) || plen + sizeof(*eth) + sizeof(*ip6) > skb->len)
			return PARSE_OTHER;
		p->family = 6;
		p->tuple.family = 6;
		__builtin_memcpy(p->tuple.client_addr, &ip6->saddr, 16);
		__builtin_memcpy(p->tuple.server_addr, &ip6->daddr, 16);
		p->ip_ecn = (bpf_ntohs(*(__be16 *)ip6) >> 4) & IP_ECN_MASK;
		p->l4_off = sizeof(*eth) + sizeof(*ip6);
		return parse_tcp(skb, p, (void *)(ip6 + 1), data_end, plen, port);
	}
	return PARSE_OTHER;
}

#endif /* __PARSE_BPF_H */
