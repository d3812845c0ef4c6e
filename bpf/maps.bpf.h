/* SPDX-License-Identifier: GPL-2.0 */
/* Maps of the fast path; the value layouts are in fileserver.h. */
#ifndef __MAPS_BPF_H
#define __MAPS_BPF_H

#include "fileserver.h"

/* request path -> everything needed to answer it (heads, sums, body location) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FS_CACHE_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fs_path_key);
	__type(value, struct fs_entry);
} file_cache SEC(".maps");

/* (body id, chunk index) -> FS_CHUNK_SIZE bytes of a cached body */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FS_DATA_CHUNKS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fs_data_key);
	__type(value, struct fs_chunk);
} file_data SEC(".maps");

/* (body id, chunk index) -> the last chunk of a stream, when it is short (FS_TAIL_CLASSES) */
#define FS_TAIL_MAP(cap)						\
struct {								\
	__uint(type, BPF_MAP_TYPE_HASH);				\
	__uint(max_entries, FS_TAIL_ENTRIES);				\
	__uint(map_flags, BPF_F_NO_PREALLOC);				\
	__type(key, struct fs_data_key);				\
	__type(value, struct fs_tail_##cap);				\
} file_tail_##cap SEC(".maps")

FS_TAIL_MAP(184);
FS_TAIL_MAP(440);
FS_TAIL_MAP(952);
FS_TAIL_MAP(1232);
FS_TAIL_MAP(1480);
FS_TAIL_MAP(1728);

/* inode of a cached file -> 1; deleted by the kernel when the inode changes */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FS_INODE_ENTRIES);
	__type(key, struct fs_inode_key);
	__type(value, __u64);
} cached_inodes SEC(".maps");

/* enum fs_stat -> counter, per CPU */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FS_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* client/server 4-tuple -> state of a connection whose handshake we completed */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FS_CONN_ENTRIES);
	__type(key, struct fs_tuple);
	__type(value, struct fs_conn);
} conn_track SEC(".maps");

/* struct fs_event records for user space (hand-offs and why) */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* [0] -> the current Date header value, written by user space every second */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fs_date);
} http_date SEC(".maps");

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += n;
}

static __always_inline void stat_inc(__u32 idx)
{
	stat_add(idx, 1);
}

#endif /* __MAPS_BPF_H */
