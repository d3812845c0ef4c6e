/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Hand a connection we own to the kernel's listener, on the segment at hand:
 * the kernel takes its sequence numbers from that packet (snd_nxt = ack_seq,
 * rcv_nxt = seq), so this works at any request boundary once the client has
 * acknowledged everything we sent. The options repeat what our SYN-ACK
 * agreed to; the timestamps come from the packet.
 */
#ifndef __HANDOFF_BPF_H
#define __HANDOFF_BPF_H

#include "parse.bpf.h"
#include "tcp.bpf.h"

extern int bpf_sk_assign_tcp_reqsk(struct __sk_buff *skb, struct sock *sk,
				   struct bpf_tcp_req_attrs *attrs, int attrs__sz) __ksym;

/* The socket the kernel would give p to: an established or TIME_WAIT one, else the listener. */
static __always_inline struct bpf_sock *kernel_socket(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_sock_tuple t = {};
	__u32 tlen;

	if (p->family == 4) {
		t.ipv4.saddr = p->tuple.client_addr[0];
		t.ipv4.daddr = p->tuple.server_addr[0];
		t.ipv4.sport = p->tuple.client_port;
		t.ipv4.dport = p->tuple.server_port;
		tlen = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, p->tuple.client_addr, 16);
		__builtin_memcpy(t.ipv6.daddr, p->tuple.server_addr, 16);
		t.ipv6.sport = p->tuple.client_port;
		t.ipv6.dport = p->tuple.server_port;
		tlen = sizeof(t.ipv6);
	}
	return bpf_skc_lookup_tcp(skb, &t, tlen, BPF_F_CURRENT_NETNS, 0);
}

/*
 * A kernel socket other than the listener holds p's tuple: an established or
 * TIME_WAIT one, or the request socket of a handshake the kernel is doing.
 */
static __noinline int kernel_holds_tuple(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_sock *skc = kernel_socket(skb, p);
	int held;

	if (!skc)
		return 0;
	held = skc->state != BPF_TCP_LISTEN;
	bpf_sk_release(skc);
	return held;
}

static __always_inline int handoff_to_listener(struct __sk_buff *skb, const struct pkt *p,
					       const struct fs_conn *c)
{
	struct bpf_tcp_req_attrs attrs = {};
	struct bpf_sock *skc;
	struct tcp_sock *tp;
	int ret = -1;

	skc = kernel_socket(skb, p);
	if (!skc)
		return -1;
	/* an established socket on this tuple would mean it is not ours */
	if (skc->state != BPF_TCP_LISTEN)
		goto release;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		goto release;

	attrs.mss = c->mss;
	if (c->flags & FS_CONN_F_WSCALE) {
		attrs.wscale_ok = 1;
		attrs.rcv_wscale = c->rcv_wscale;
		attrs.snd_wscale = c->snd_wscale;
	}
	attrs.sack_ok = !!(c->flags & FS_CONN_F_SACK);
	attrs.ecn_ok = !!(c->flags & FS_CONN_F_ECN);
	if (c->flags & FS_CONN_F_TSTAMP) {
		attrs.tstamp_ok = 1;
		attrs.rcv_tsval = p->tsval;
		attrs.rcv_tsecr = p->tsecr;
	}
	ret = bpf_sk_assign_tcp_reqsk(skb, (struct sock *)tp, &attrs, sizeof(attrs));
release:
	bpf_sk_release(skc);
	return ret;
}

/*
 * Tell user space about a request: which went its way and why (cache
 * admission, stats), or what the kernel answered (access log).
 */
static __always_inline void report(const struct scratch *s, const struct pkt *p, __u32 type,
				   __u32 reason, __u16 status, __u32 body_bytes)
{
	struct fs_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	if (!ev)
		return;
	ev->type = type;
	ev->reason = reason;
	__builtin_memcpy(&ev->key, &s->key, sizeof(ev->key));
	ev->ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(ev->client_addr, p->tuple.client_addr, sizeof(ev->client_addr));
	ev->client_port = p->tuple.client_port;
	ev->status = status;
	ev->body_bytes = body_bytes;
	ev->family = p->family;
	ev->method = s->http.method;
	ev->http_minor = s->http.minor;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

#endif /* __HANDOFF_BPF_H */
