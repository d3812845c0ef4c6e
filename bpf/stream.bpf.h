/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A file version's byte stream in file_data (the 200 head, then the body, cut
 * into FS_CHUNK_SIZE chunks, fileserver.h) copied into an skb from any offset.
 *
 * FS_CHUNK_SIZE is not a power of two (it makes a file_data element exactly a
 * kmalloc size class), so offsets inside a chunk are bounded by comparisons,
 * not masks. The verifier takes the largest offset and the largest length of a
 * copy separately, so a copy from inside a chunk is cut at STREAM_SPLIT: a piece
 * starting below it is stored straight from the chunk in two parts, one starting
 * above it goes through a per-CPU stage holding the chunk's upper part.
 *
 * Global functions: the verifier checks each once, whatever calls it.
 */
#ifndef __STREAM_BPF_H
#define __STREAM_BPF_H

#include "maps.bpf.h"
#include "scratch.bpf.h"

/* 8-byte aligned, and (SPLIT - 1) + SPLIT <= FS_CHUNK_SIZE */
#define STREAM_SPLIT	(((FS_CHUNK_SIZE + 1) / 2) & ~7)
#define STREAM_UPPER	(FS_CHUNK_SIZE - STREAM_SPLIT)

_Static_assert(STREAM_SPLIT * 2 - 1 <= FS_CHUNK_SIZE, "stream split");
_Static_assert(STREAM_UPPER % 8 == 0 && 2 * STREAM_UPPER <= STREAM_STAGE, "stream stage");

static __always_inline struct fs_chunk *chunk_get(__u64 data_id, __u32 index)
{
	struct fs_data_key k = { .data_id = data_id, .index = index };

	return bpf_map_lookup_elem(&file_data, &k);
}

/* Stream bytes [soff, soff + n) of version data_id into the skb at pos; n stays in one chunk. */
__noinline int fs_put_chunk(struct __sk_buff *skb, __u32 pos, __u64 data_id, __u32 soff, __u32 n)
{
	struct scratch *s = scratch_get();
	struct fs_chunk *chunk;
	__u32 index = soff / FS_CHUNK_SIZE, x = soff - index * FS_CHUNK_SIZE, first;

	if (!s || n == 0 || x >= FS_CHUNK_SIZE || n > FS_CHUNK_SIZE - x)
		return -1;
	chunk = chunk_get(data_id, index);
	if (!chunk)
		return -1;
	if (x == 0) {
		barrier_var(n);		/* n <= FS_CHUNK_SIZE - x keeps no bound of its own */
		if (n > FS_CHUNK_SIZE)
			return -1;
		return bpf_skb_store_bytes(skb, pos, chunk->data, n, 0);
	}
	if (x < STREAM_SPLIT) {
		first = STREAM_SPLIT - x;
		if (first > n)
			first = n;
		barrier_var(first);
		if (first < 1 || first > STREAM_SPLIT)
			return -1;
		if (bpf_skb_store_bytes(skb, pos, &chunk->data[x], first, 0))
			return -1;
		if (first == n)
			return 0;
		pos += first;
		n -= first;
		barrier_var(n);
		if (n < 1 || n > STREAM_UPPER)
			return -1;
		return bpf_skb_store_bytes(skb, pos, &chunk->data[STREAM_SPLIT], n, 0);
	}
	__builtin_memcpy((__u64 *)s->stage, (const __u64 *)&chunk->data[STREAM_SPLIT], STREAM_UPPER);
	x -= STREAM_SPLIT;
	barrier_var(x);
	if (x >= STREAM_UPPER || n > STREAM_UPPER)
		return -1;
	return bpf_skb_store_bytes(skb, pos, &s->stage[x], n, 0);
}

/*
 * Stream bytes [soff, soff + len) into the skb at pos, len at most one segment:
 * up to the first chunk's end, whole chunks, the rest.
 */
static __always_inline int fs_put_stream(struct __sk_buff *skb, __u32 pos, __u64 data_id, __u32 soff,
					 __u32 len)
{
	__u32 n, k;

	if (!len)
		return 0;
	if (len > FS_SEGMENT_MAX)
		return -1;
	n = FS_CHUNK_SIZE - soff % FS_CHUNK_SIZE;
	if (n > len)
		n = len;
	if (fs_put_chunk(skb, pos, data_id, soff, n))
		return -1;
	pos += n;
	soff += n;
	len -= n;
	for (k = 0; k < FS_SEGMENT_MAX / FS_CHUNK_SIZE; k++) {
		if (len < FS_CHUNK_SIZE)
			break;
		if (fs_put_chunk(skb, pos, data_id, soff, FS_CHUNK_SIZE))
			return -1;
		pos += FS_CHUNK_SIZE;
		soff += FS_CHUNK_SIZE;
		len -= FS_CHUNK_SIZE;
	}
	if (len && fs_put_chunk(skb, pos, data_id, soff, len))
		return -1;
	return 0;
}

#endif /* __STREAM_BPF_H */
