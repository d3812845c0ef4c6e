/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Segments we send: headers built in the per-CPU scratch area from the packet
 * being answered, written over it with one store, checksums complete (valid on
 * loopback's CHECKSUM_PARTIAL skbs and on any device).
 */
#ifndef __TCP_BPF_H
#define __TCP_BPF_H

#include <bpf/bpf_core_read.h>

#include "parse.bpf.h"
#include "csum.bpf.h"
#include "maps.bpf.h"

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

#define CHECKSUM_PARTIAL 3	/* skb->ip_summed: the transmitter completes the TCP sum */

/* Our window scale: what Linux picks for its default buffers. */
#define OUR_WSCALE	7
#define OUR_WINDOW	65535
#define TS_OPT_LEN	12		/* NOP NOP TS */
#define SYN_OPT_LEN	20		/* MSS, SACK-permitted, TS, NOP, WS (NOPs where off) */
#define IPV4_MAX_MSS	65495
#define IP_TCP_HDR_MAX	60		/* IPv6 + TCP headers: an MTU not above it is unknown */
#define IP_TTL		64

/* The network namespace's TCP settings and the device's MTU. */
struct net_cfg {
	__u32 mtu;
	__u8 syncookies;
	__u8 sack;
	__u8 timestamps;
	__u8 window_scaling;
	__u8 ecn;
};

static __always_inline void net_cfg_read(struct __sk_buff *skb, struct net_cfg *cfg)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	struct net_device *dev = kskb->dev;
	struct net *net;

	if (!dev)
		return;
	net = dev->nd_net.net;
	if (!net)
		return;
	cfg->mtu = dev->mtu;
	cfg->syncookies = net->ipv4.sysctl_tcp_syncookies;
	cfg->sack = net->ipv4.sysctl_tcp_sack;
	cfg->timestamps = net->ipv4.sysctl_tcp_timestamps;
	cfg->window_scaling = net->ipv4.sysctl_tcp_window_scaling;
	cfg->ecn = net->ipv4.sysctl_tcp_ecn;
}

/* The kernel's TCP timestamp clock (tcp_clock_ms): a hand-off continues it. */
static __always_inline __u32 tcp_now_ms(void)
{
	return bpf_ktime_get_ns() / 1000000;
}

/* What goes into one segment's headers. */
struct seg {
	__u32 seq;
	__u32 ack;
	__u32 tsval;
	__u32 tsecr;
	__u32 payload_len;
	__u16 payload_sum;		/* folded sum of the payload, see csum.bpf.h */
	__u16 window;
	__u16 mss;			/* SYN-ACK only */
	__u8 flags;
	__u8 ts;			/* carry the timestamp option */
	__u8 syn;			/* SYN-ACK option block */
	__u8 wscale;			/* SYN-ACK: ours, NO_WSCALE when off */
	__u8 sack;			/* SYN-ACK: SACK permitted */
	__u8 partial;			/* the skb is CHECKSUM_PARTIAL (see tcp_check) */
};

/* The skb came from a local socket (lo, a veth peer) whose checksum is still to be done. */
static __always_inline int skb_csum_partial(struct __sk_buff *skb)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);

	return BPF_CORE_READ_BITFIELD(kskb, ip_summed) == CHECKSUM_PARTIAL;
}

static __always_inline void put_be32(__u8 *b, __u32 v)
{
	b[0] = v >> 24;
	b[1] = v >> 16;
	b[2] = v >> 8;
	b[3] = v;
}

/* TCP options into o (20 bytes); returns their length. */
static __always_inline __u32 build_options(__u8 *o, const struct seg *g)
{
	__u32 i;

	if (!g->syn) {
		if (!g->ts)
			return 0;
		o[0] = TCPOPT_NOP;
		o[1] = TCPOPT_NOP;
		o[2] = TCPOPT_TIMESTAMP;
		o[3] = 10;
		put_be32(&o[4], g->tsval);
		put_be32(&o[8], g->tsecr);
		return TS_OPT_LEN;
	}
#pragma unroll
	for (i = 0; i < SYN_OPT_LEN; i++)
		o[i] = TCPOPT_NOP;
	o[0] = TCPOPT_MSS;
	o[1] = 4;
	o[2] = g->mss >> 8;
	o[3] = g->mss;
	if (g->sack) {
		o[4] = TCPOPT_SACK_PERM;
		o[5] = 2;
	}
	if (g->ts) {
		o[6] = TCPOPT_TIMESTAMP;
		o[7] = 10;
		put_be32(&o[8], g->tsval);
		put_be32(&o[12], g->tsecr);
	}
	if (g->wscale != NO_WSCALE) {
		o[17] = TCPOPT_WINDOW;
		o[18] = 3;
		o[19] = g->wscale;
	}
	return SYN_OPT_LEN;
}

static __always_inline void build_tcp(struct tcphdr *th, const struct pkt *p, const struct seg *g,
				      __u32 th_len)
{
	th->source = p->tuple.server_port;
	th->dest = p->tuple.client_port;
	th->seq = bpf_htonl(g->seq);
	th->ack_seq = bpf_htonl(g->ack);
	((__u8 *)th)[12] = (th_len / 4) << 4;
	((__u8 *)th)[13] = g->flags;
	th->window = bpf_htons(g->window);
	th->check = 0;
	th->urg_ptr = 0;
}

/*
 * The TCP checksum field. A CHECKSUM_PARTIAL skb stays one (its csum_start and
 * csum_offset still point at our TCP header): the field gets the pseudo-header
 * sum and whoever transmits completes it, the device or skb_checksum_help()
 * when it does not offload (a complete sum there would be summed over again).
 * Any other skb gets the complete checksum.
 */
static __always_inline __u16 tcp_check(__u64 pseudo, struct tcphdr *th, __u32 th_len,
				       const struct seg *g)
{
	__u64 sum = pseudo + g->payload_sum;

	if (g->partial)
		return csum_fold16(pseudo);
	if (th_len == sizeof(struct tcphdr) + SYN_OPT_LEN)
		sum = csum_buf(th, sizeof(struct tcphdr) + SYN_OPT_LEN, sum);
	else if (th_len == sizeof(struct tcphdr) + TS_OPT_LEN)
		sum = csum_buf(th, sizeof(struct tcphdr) + TS_OPT_LEN, sum);
	else
		sum = csum_buf(th, sizeof(struct tcphdr), sum);
	return ~csum_fold16(sum);
}

/*
 * Build eth/IP/TCP headers for segment g answering packet p into s->hdr.
 * Returns the header length (the payload goes right after it).
 */
static __always_inline __u32 build_headers(struct scratch *s, const struct pkt *p,
					   const struct seg *g)
{
	struct reply_hdr *h = &s->hdr;
	__u32 th_len, ip_len;
	__u64 pseudo;

	__builtin_memcpy(h->eth.h_dest, p->mac_client, ETH_ALEN);
	__builtin_memcpy(h->eth.h_source, p->mac_server, ETH_ALEN);

	if (p->family == 4) {
		struct iphdr *ip = &h->v4.ip;

		th_len = sizeof(struct tcphdr) + build_options(h->v4.opts, g);
		ip_len = sizeof(*ip);
		h->eth.h_proto = bpf_htons(ETH_P_IP);
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = 0;
		ip->tot_len = bpf_htons(ip_len + th_len + g->payload_len);
		ip->id = 0;
		ip->frag_off = bpf_htons(IP_DF);
		ip->ttl = IP_TTL;
		ip->protocol = IPPROTO_TCP_NR;
		ip->check = 0;
		ip->saddr = p->tuple.server_addr[0];
		ip->daddr = p->tuple.client_addr[0];
		ip->check = ~csum_fold16(csum_buf(ip, sizeof(*ip), 0));

		build_tcp(&h->v4.tcp, p, g, th_len);
		pseudo = csum_buf(&ip->saddr, 8, 0);
		pseudo += bpf_htons(IPPROTO_TCP_NR) + bpf_htons(th_len + g->payload_len);
		h->v4.tcp.check = tcp_check(pseudo, &h->v4.tcp, th_len, g);
	} else {
		struct ipv6hdr *ip6 = &h->v6.ip;

		th_len = sizeof(struct tcphdr) + build_options(h->v6.opts, g);
		ip_len = sizeof(*ip6);
		h->eth.h_proto = bpf_htons(ETH_P_IPV6);
		*(__be32 *)ip6 = bpf_htonl(0x60000000);
		ip6->payload_len = bpf_htons(th_len + g->payload_len);
		ip6->nexthdr = IPPROTO_TCP_NR;
		ip6->hop_limit = IP_TTL;
		__builtin_memcpy(&ip6->saddr, p->tuple.server_addr, 16);
		__builtin_memcpy(&ip6->daddr, p->tuple.client_addr, 16);

		build_tcp(&h->v6.tcp, p, g, th_len);
		pseudo = csum_buf(&ip6->saddr, 32, 0);
		pseudo += bpf_htons(IPPROTO_TCP_NR) + bpf_htons(th_len + g->payload_len);
		h->v6.tcp.check = tcp_check(pseudo, &h->v6.tcp, th_len, g);
	}
	return sizeof(struct ethhdr) + ip_len + th_len;
}

/*
 * Turn the skb into headers (from s->hdr) plus payload_len bytes the caller
 * writes at the returned offset. Returns < 0 when the skb cannot be resized.
 */
static __always_inline long emit_headers(struct __sk_buff *skb, struct scratch *s, __u32 hdr_len,
					 __u32 payload_len)
{
	long err;

	if (hdr_len > sizeof(s->hdr) - 2)
		return -1;
	err = bpf_skb_change_tail(skb, hdr_len + payload_len, 0);
	if (err)
		return err;
	err = bpf_skb_store_bytes(skb, 0, &s->hdr.eth, hdr_len, 0);
	if (err)
		return err;
	return hdr_len;
}

/*
 * Send the rewritten skb back out of the device it came in on. (Into lo's
 * receive path directly with BPF_F_INGRESS would skip a step on loopback, but
 * such packets never reach the client socket on this kernel.)
 */
static __always_inline int send_back(struct __sk_buff *skb)
{
	return bpf_redirect(skb->ifindex, 0);
}

/* Send a segment without payload (SYN-ACK, ACK, FIN) in place of p. */
static __always_inline int send_bare(struct __sk_buff *skb, const struct pkt *p, struct seg *g)
{
	struct scratch *s = scratch_get();
	__u32 hdr_len;

	if (!s)
		return TC_ACT_SHOT;
	g->payload_len = 0;
	g->payload_sum = 0;
	g->partial = skb_csum_partial(skb);
	hdr_len = build_headers(s, p, g);
	if (emit_headers(skb, s, hdr_len, 0) < 0) {
		stat_inc(FS_STAT_ERRORS);
		return TC_ACT_SHOT;
	}
	return send_back(skb);
}

#endif /* __TCP_BPF_H */
