/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A file version's byte stream (the 200 head, then the body, cut into
 * FS_CHUNK_SIZE chunks, fileserver.h) copied into an skb from any offset. Its
 * chunks are in file_data but the last one, which is in the tail map its length
 * calls for (stream_tail_class(): user space places it by the same rule).
 *
 * FS_CHUNK_SIZE is not a power of two (it makes a file_data element exactly a
 * kmalloc size class), so offsets inside a chunk are bounded by comparisons,
 * not masks. The verifier takes the largest offset and the largest length of a
 * copy separately, so a copy from inside a chunk of cap bytes is cut at
 * STREAM_SPLIT(cap): a piece starting below it is stored straight from the
 * chunk in two parts, one starting above it goes through a per-CPU stage
 * holding the chunk's upper part.
 *
 * Global functions: the verifier checks each once, whatever calls it.
 */
#ifndef __STREAM_BPF_H
#define __STREAM_BPF_H

#include "maps.bpf.h"
#include "scratch.bpf.h"

/* 8-byte aligned, and (SPLIT - 1) + SPLIT <= cap */
#define STREAM_SPLIT(cap)	((((cap) + 1) / 2) & ~7)
#define STREAM_UPPER(cap)	((cap) - STREAM_SPLIT(cap))

_Static_assert(STREAM_SPLIT(FS_CHUNK_SIZE) * 2 - 1 <= FS_CHUNK_SIZE, "stream split");
_Static_assert(STREAM_UPPER(FS_CHUNK_SIZE) % 8 == 0 &&
	       2 * STREAM_UPPER(FS_CHUNK_SIZE) <= STREAM_STAGE, "stream stage");
_Static_assert(sizeof(struct fs_tail_184) == FS_TAIL_CAP_1 && FS_TAIL_CAP_1 % 8 == 0 &&
	       sizeof(struct fs_tail_440) == FS_TAIL_CAP_2 && FS_TAIL_CAP_2 % 8 == 0 &&
	       sizeof(struct fs_tail_952) == FS_TAIL_CAP_3 && FS_TAIL_CAP_3 % 8 == 0 &&
	       sizeof(struct fs_tail_1232) == FS_TAIL_CAP_4 && FS_TAIL_CAP_4 % 8 == 0 &&
	       sizeof(struct fs_tail_1480) == FS_TAIL_CAP_5 && FS_TAIL_CAP_5 % 8 == 0 &&
	       sizeof(struct fs_tail_1728) == FS_TAIL_CAP_6 && FS_TAIL_CAP_6 % 8 == 0 &&
	       FS_TAIL_CAP_6 < FS_CHUNK_SIZE, "tail classes");
_Static_assert(FS_HEAD_ROOM == FS_HEAD_MAX + 8 && FS_HEAD_ROOM <= FS_TAIL_CAP_2 &&
	       FS_HEAD_ROOM % 8 == 0, "head room");

/*
 * The tail class of a stream of len bytes: which tail map holds its last chunk
 * (1..FS_TAIL_CLASSES), or 0 when that is a file_data chunk (none shorter, or
 * too long for the largest tail map). A stream shorter than a chunk needs
 * FS_HEAD_ROOM bytes at least (head_load reads them whole).
 */
static __always_inline __u32 stream_tail_class(__u32 len)
{
	__u32 r = len % FS_CHUNK_SIZE;

	if (!r)
		return 0;
	if (len < FS_CHUNK_SIZE && r < FS_HEAD_ROOM)
		r = FS_HEAD_ROOM;
	if (r <= FS_TAIL_CAP_1)
		return 1;
	if (r <= FS_TAIL_CAP_2)
		return 2;
	if (r <= FS_TAIL_CAP_3)
		return 3;
	if (r <= FS_TAIL_CAP_4)
		return 4;
	if (r <= FS_TAIL_CAP_5)
		return 5;
	if (r <= FS_TAIL_CAP_6)
		return 6;
	return 0;
}

/* The tail class of chunk 0 of a stream of len bytes (0: a file_data chunk). */
static __always_inline __u32 stream_class0(__u32 len)
{
	return len < FS_CHUNK_SIZE ? stream_tail_class(len) : 0;
}

static __always_inline struct fs_chunk *chunk_get(__u64 data_id, __u32 index)
{
	struct fs_data_key k = { .data_id = data_id, .index = index };

	return bpf_map_lookup_elem(&file_data, &k);
}

/*
 * The key of scratch[0] for put_piece: a constant's address, not a stack slot
 * (the frames of fs_send -> fs_emit_segment -> fs_put_payload -> fs_put_chunk
 * share the 512-byte stack with the program's own).
 */
static const __u32 stage_key = 0;

/* Bytes [x, x + n) of a chunk of cap bytes at data into the skb at pos. */
static __always_inline int put_piece(struct __sk_buff *skb, __u32 pos, const __u8 *data,
				     const __u32 cap, __u32 x, __u64 len)
{
	struct scratch *s;
	__u32 first, n;

	/* a 64-bit comparison: the upper half of a global function's argument is unknown */
	if (len == 0 || x >= cap || len > cap - x)
		return -1;
	n = len;
	if (x == 0) {
		barrier_var(n);		/* n <= cap - x keeps no bound of its own */
		if (n < 1 || n > cap)
			return -1;
		return bpf_skb_store_bytes(skb, pos, data, n, 0);
	}
	if (x < STREAM_SPLIT(cap)) {
		first = STREAM_SPLIT(cap) - x;
		if (first > n)
			first = n;
		barrier_var(first);
		if (first < 1 || first > STREAM_SPLIT(cap))
			return -1;
		if (bpf_skb_store_bytes(skb, pos, &data[x], first, 0))
			return -1;
		if (first == n)
			return 0;
		pos += first;
		n -= first;
		barrier_var(n);
		if (n < 1 || n > STREAM_UPPER(cap))
			return -1;
		return bpf_skb_store_bytes(skb, pos, &data[STREAM_SPLIT(cap)], n, 0);
	}
	s = bpf_map_lookup_elem(&scratch, &stage_key);
	if (!s)
		return -1;
	__builtin_memcpy((__u64 *)s->stage, (const __u64 *)&data[STREAM_SPLIT(cap)], STREAM_UPPER(cap));
	x -= STREAM_SPLIT(cap);
	barrier_var(x);
	if (x >= STREAM_UPPER(cap) || n < 1 || n > STREAM_UPPER(cap))
		return -1;
	return bpf_skb_store_bytes(skb, pos, &s->stage[x], n, 0);
}

#define PUT_FROM(map, cap)							\
	do {									\
		v = bpf_map_lookup_elem(&map, &k);				\
		if (!v)								\
			return -1;						\
		return put_piece(skb, pos, v, cap, x, n);			\
	} while (0)

/*
 * Stream bytes [soff, soff + n) of version data_id into the skb at pos; n stays in
 * one chunk. n_len: n in the low half, the stream's length in the high one (which
 * tells where its last chunk is; a global function takes five arguments).
 */
__noinline int fs_put_chunk(struct __sk_buff *skb, __u32 pos, __u64 data_id, __u32 soff, __u64 n_len)
{
	__u32 len = n_len >> 32, index = soff / FS_CHUNK_SIZE, x = soff - index * FS_CHUNK_SIZE;
	struct fs_data_key k = { .data_id = data_id, .index = index };
	__u64 n = n_len & 0xffffffff;
	const __u8 *v;

	switch (index == len / FS_CHUNK_SIZE ? stream_tail_class(len) : 0) {
	case 0:
		PUT_FROM(file_data, FS_CHUNK_SIZE);
	case 1:
		PUT_FROM(file_tail_184, FS_TAIL_CAP_1);
	case 2:
		PUT_FROM(file_tail_440, FS_TAIL_CAP_2);
	case 3:
		PUT_FROM(file_tail_952, FS_TAIL_CAP_3);
	case 4:
		PUT_FROM(file_tail_1232, FS_TAIL_CAP_4);
	case 5:
		PUT_FROM(file_tail_1480, FS_TAIL_CAP_5);
	case 6:
		PUT_FROM(file_tail_1728, FS_TAIL_CAP_6);
	}
	return -1;
}

/*
 * Bytes [soff, soff + len) of a stream of stream_len bytes into the skb at pos,
 * len at most one segment: up to the first chunk's end, whole chunks, the rest.
 */
static __always_inline int fs_put_stream(struct __sk_buff *skb, __u32 pos, __u64 data_id, __u32 soff,
					 __u32 len, __u32 stream_len)
{
	__u64 hi = (__u64)stream_len << 32;
	__u32 n, k;

	if (!len)
		return 0;
	if (len > FS_SEGMENT_MAX)
		return -1;
	n = FS_CHUNK_SIZE - soff % FS_CHUNK_SIZE;
	if (n > len)
		n = len;
	if (fs_put_chunk(skb, pos, data_id, soff, hi | n))
		return -1;
	pos += n;
	soff += n;
	len -= n;
	for (k = 0; k < FS_SEGMENT_MAX / FS_CHUNK_SIZE; k++) {
		if (len < FS_CHUNK_SIZE)
			break;
		if (fs_put_chunk(skb, pos, data_id, soff, hi | FS_CHUNK_SIZE))
			return -1;
		pos += FS_CHUNK_SIZE;
		soff += FS_CHUNK_SIZE;
		len -= FS_CHUNK_SIZE;
	}
	if (len && fs_put_chunk(skb, pos, data_id, soff, hi | len))
		return -1;
	return 0;
}

/*
 * The first FS_HEAD_ROOM bytes of a stream of stream_len bytes (chunk 0, in
 * file_data or a tail map) into dst, which has room for them.
 */
#define HEAD_LOAD_FROM(map)							\
	do {									\
		v = bpf_map_lookup_elem(&map, &k);				\
		if (!v)								\
			return -1;						\
		__builtin_memcpy((__u64 *)dst, (const __u64 *)v, FS_HEAD_ROOM);	\
		return 0;							\
	} while (0)

static __always_inline int head_load(__u8 *dst, __u64 data_id, __u32 stream_len)
{
	struct fs_data_key k = { .data_id = data_id, .index = 0 };
	void *v;

	switch (stream_class0(stream_len)) {
	case 0:
		HEAD_LOAD_FROM(file_data);
	case 2:
		HEAD_LOAD_FROM(file_tail_440);
	case 3:
		HEAD_LOAD_FROM(file_tail_952);
	case 4:
		HEAD_LOAD_FROM(file_tail_1232);
	case 5:
		HEAD_LOAD_FROM(file_tail_1480);
	case 6:
		HEAD_LOAD_FROM(file_tail_1728);
	}
	return -1;	/* class 1 is smaller than FS_HEAD_ROOM: never chunk 0 */
}

/* Chunk 0 of version data_id is still there (class0: stream_class0() of its length). */
static __always_inline int stream_chunk0_present(__u64 data_id, __u32 class0)
{
	struct fs_data_key k = { .data_id = data_id, .index = 0 };

	switch (class0) {
	case 0:
		return bpf_map_lookup_elem(&file_data, &k) != NULL;
	case 2:
		return bpf_map_lookup_elem(&file_tail_440, &k) != NULL;
	case 3:
		return bpf_map_lookup_elem(&file_tail_952, &k) != NULL;
	case 4:
		return bpf_map_lookup_elem(&file_tail_1232, &k) != NULL;
	case 5:
		return bpf_map_lookup_elem(&file_tail_1480, &k) != NULL;
	case 6:
		return bpf_map_lookup_elem(&file_tail_1728, &k) != NULL;
	}
	return 0;
}

#endif /* __STREAM_BPF_H */
