/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Internet checksum arithmetic. Sums are kept the way csum_partial() and
 * bpf_csum_diff() produce them on a little-endian host: 16-bit words as they
 * lie in memory, so a folded, inverted sum is stored into a header as is.
 */
#ifndef __CSUM_BPF_H
#define __CSUM_BPF_H

static __always_inline __u16 csum_fold16(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* A sum over bytes that start at an odd offset counts with its bytes swapped. */
static __always_inline __u16 csum_at_offset(__u16 sum, __u32 offset)
{
	return offset & 1 ? (__u16)(sum << 8 | sum >> 8) : sum;
}

/* Sum of a buffer whose length is a multiple of 4 and at most 512 bytes. */
static __always_inline __u64 csum_buf(void *buf, __u32 len, __u64 seed)
{
	long s = bpf_csum_diff(NULL, 0, buf, len, 0);

	return seed + (__u32)s;
}

#endif /* __CSUM_BPF_H */
