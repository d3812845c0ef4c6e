/* SPDX-License-Identifier: GPL-2.0 */
/*
 * One CPU at a time per connection.
 *
 * On loopback and veth a packet is received on the CPU that sent it, so a
 * client's ACKs for one connection reach the program on both CPUs at once:
 * those its stack sends as our data arrives and those its application sends
 * as it reads. Two runs on one conn_track value would plan the same segments
 * (sent twice) or interleave them (reordered), which the client reports as
 * duplicates and holes, and the sender takes for losses (measured: 64 KiB
 * answers over a lossless veth, 18,110 fast retransmits in 54,410 answers;
 * 161 with wrk pinned to one CPU). So every run that reads or writes a
 * connection's state - a packet, a kick, the timer - holds its lock.
 *
 * The locks are a striped array indexed by a hash of the tuple, apart from
 * conn_track's values: they outlive a deleted entry and cost no ABI change.
 * Every holder runs with bottom halves off (softirq, or a test run, which
 * disables them too), so it is never preempted on its CPU and a waiter spins
 * only while another CPU works: a few microseconds. The spin is still bounded.
 */
#ifndef __CONN_LOCK_BPF_H
#define __CONN_LOCK_BPF_H

#include "fileserver.h"
#include "maps.bpf.h"

#define CONN_LOCK_SLOTS	4096		/* power of two */
#define CONN_LOCK_SPINS	(1 << 16)	/* tries before a waiter gives up: about a ms */

/* slot -> 1 while a CPU works on a connection hashed there, else 0 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CONN_LOCK_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} conn_locks SEC(".maps");

static __always_inline __u32 conn_lock_slot(const struct fs_tuple *t)
{
	__u32 h = t->client_addr[0] ^ t->client_addr[1] ^ t->client_addr[2] ^ t->client_addr[3];

	h ^= (__u32)t->client_port << 16 | t->server_port;
	return (h * 0x9e3779b1u) >> 20 & (CONN_LOCK_SLOTS - 1);
}

static __always_inline int conn_trylock(__u32 slot)
{
	__u32 *lock = bpf_map_lookup_elem(&conn_locks, &slot);

	return lock && __sync_val_compare_and_swap(lock, 0, 1) == 0;
}

struct lock_wait {
	__u32 slot;
	__u32 locked;
};

static long conn_lock_try(__u64 i, void *ctx)
{
	struct lock_wait *w = ctx;

	if (!conn_trylock(w->slot))
		return 0;
	w->locked = 1;
	return 1;
}

/* Take the lock of t's slot; returns the slot, or -1 when it stayed busy. */
static __always_inline int conn_lock(const struct fs_tuple *t)
{
	struct lock_wait w = { .slot = conn_lock_slot(t) };

	if (conn_trylock(w.slot))
		return w.slot;
	stat_inc(FS_STAT_LOCK_WAITS);
	bpf_loop(CONN_LOCK_SPINS, conn_lock_try, &w, 0);
	if (w.locked)
		return w.slot;
	stat_inc(FS_STAT_LOCK_TIMEOUTS);
	return -1;
}

static __always_inline void conn_unlock(__u32 slot)
{
	__u32 *lock = bpf_map_lookup_elem(&conn_locks, &slot);

	if (lock)
		__sync_lock_test_and_set(lock, 0);	/* an exchange: a full barrier */
}

#endif /* __CONN_LOCK_BPF_H */
