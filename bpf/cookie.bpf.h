/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Stateless SYN cookies: the ISN of our SYN-ACK is
 *
 *	hash(secret, 4-tuple, client ISN, time slot, opts)[31:9] | opts
 *
 * where opts (9 bits) = MSS table index (3) | window scale (4, 15 = none) |
 * SACK permitted (1) | ECN (1). The handshake ACK acknowledges ISN + 1, so its
 * ack_seq - 1 gives the cookie back, seq - 1 the client's ISN; the hash is
 * checked for the current and the previous time slot (68.7 s each). Nothing is
 * stored before the handshake completes, so a SYN flood costs no state.
 * Timestamps need no bits: a client that agreed to them sends them on every
 * segment, so the ACK itself says whether they are on.
 */
#ifndef __COOKIE_BPF_H
#define __COOKIE_BPF_H

#include "parse.bpf.h"

#define COOKIE_OPT_BITS		9
#define COOKIE_OPT_MASK		((1u << COOKIE_OPT_BITS) - 1)
#define COOKIE_MSS_MASK		0x7
#define COOKIE_WSCALE_SHIFT	3
#define COOKIE_WSCALE_NONE	15
#define COOKIE_SACK		(1u << 7)
#define COOKIE_ECN		(1u << 8)
#define COOKIE_SLOT_SHIFT	36	/* ns -> 68.7 s slots */
#define TCP_MAX_WSCALE		14

/* MSS values a cookie can carry: the largest one not above the client's is used. */
static const __u16 cookie_mss_table[8] = {
	536, 1220, 1360, 1400, 1440, 1460, 8940, 65476,
};

/* Secret of the cookie hash: drawn on first use, never leaves the kernel. */
static __u64 cookie_secret[2];

struct cookie_opts {
	__u16 mss;
	__u8 wscale;			/* NO_WSCALE when the client sent none */
	__u8 sack_ok;
	__u8 ecn_ok;
};

#define SIP_ROTL(x, b) (__u64)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND(v0, v1, v2, v3)					\
	do {								\
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0;		\
		v0 = SIP_ROTL(v0, 32);					\
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;		\
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;		\
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2;		\
		v2 = SIP_ROTL(v2, 32);					\
	} while (0)

static __always_inline __u64 cookie_secret_word(int i)
{
	__u64 *w = &cookie_secret[i & 1];

	if (!*w)
		__sync_val_compare_and_swap(w, 0, ((__u64)bpf_get_prandom_u32() << 32 |
						    bpf_get_prandom_u32()) | 1);
	return *w;
}

/* SipHash-2-4 over six 64-bit words. */
static __always_inline __u64 siphash_6u64(const __u64 m[6])
{
	__u64 k0 = cookie_secret_word(0), k1 = cookie_secret_word(1);
	__u64 v0 = k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = k1 ^ 0x7465646279746573ULL;
	int i;

#pragma unroll
	for (i = 0; i < 6; i++) {
		v3 ^= m[i];
		SIP_ROUND(v0, v1, v2, v3);
		SIP_ROUND(v0, v1, v2, v3);
		v0 ^= m[i];
	}
	v3 ^= 48ULL << 56;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= 48ULL << 56;
	v2 ^= 0xff;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	return v0 ^ v1 ^ v2 ^ v3;
}

static __always_inline __u32 cookie_hash(const struct fs_tuple *t, __u32 client_isn,
					 __u64 slot, __u32 opts)
{
	__u64 m[6];

	m[0] = (__u64)t->client_addr[0] << 32 | t->client_addr[1];
	m[1] = (__u64)t->client_addr[2] << 32 | t->client_addr[3];
	m[2] = (__u64)t->server_addr[0] << 32 | t->server_addr[1];
	m[3] = (__u64)t->server_addr[2] << 32 | t->server_addr[3];
	m[4] = (__u64)client_isn << 32 | (__u32)t->client_port << 16 | t->server_port;
	m[5] = slot << 16 | opts << 4 | t->family;
	return (__u32)siphash_6u64(m);
}

static __always_inline __u64 cookie_slot(void)
{
	return bpf_ktime_get_ns() >> COOKIE_SLOT_SHIFT;
}

/* Option bits for a SYN; also clamps what we agree to. */
static __always_inline __u32 cookie_encode_opts(const struct cookie_opts *o)
{
	__u32 idx = 0, i;
	__u32 opts;

#pragma unroll
	for (i = 1; i < 8; i++)
		if (cookie_mss_table[i] <= o->mss)
			idx = i;
	opts = idx;
	opts |= (o->wscale == NO_WSCALE ? COOKIE_WSCALE_NONE : o->wscale) << COOKIE_WSCALE_SHIFT;
	if (o->sack_ok)
		opts |= COOKIE_SACK;
	if (o->ecn_ok)
		opts |= COOKIE_ECN;
	return opts;
}

static __always_inline __u32 cookie_make(const struct fs_tuple *t, __u32 client_isn,
					 const struct cookie_opts *o)
{
	__u32 opts = cookie_encode_opts(o);

	return (cookie_hash(t, client_isn, cookie_slot(), opts) & ~COOKIE_OPT_MASK) | opts;
}

/* 0 and the options when ack_seq - 1 is a cookie we issued for this tuple. */
static __always_inline int cookie_check(const struct fs_tuple *t, __u32 client_isn, __u32 cookie,
					struct cookie_opts *o)
{
	__u32 opts = cookie & COOKIE_OPT_MASK;
	__u64 slot = cookie_slot();
	__u32 ws;

	if ((cookie_hash(t, client_isn, slot, opts) ^ cookie) & ~COOKIE_OPT_MASK &&
	    (cookie_hash(t, client_isn, slot - 1, opts) ^ cookie) & ~COOKIE_OPT_MASK)
		return -1;
	ws = (opts >> COOKIE_WSCALE_SHIFT) & 0xf;
	if (ws != COOKIE_WSCALE_NONE && ws > TCP_MAX_WSCALE)
		return -1;
	o->mss = cookie_mss_table[opts & COOKIE_MSS_MASK];
	o->wscale = ws == COOKIE_WSCALE_NONE ? NO_WSCALE : ws;
	o->sack_ok = !!(opts & COOKIE_SACK);
	o->ecn_ok = !!(opts & COOKIE_ECN);
	return 0;
}

#endif /* __COOKIE_BPF_H */
