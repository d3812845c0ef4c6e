/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Cached files stop being answered the moment they change. Every change that
 * matters (a write, truncate, chmod or utime, a rename over the file, its
 * unlink) sets the inode's ctime, and every ctime update passes one of the
 * tracepoints below, in the changing task, before its system call returns.
 * Tracepoints need no BPF trampoline, so this works where fentry/LSM are
 * refused (lockdown). The TC program checks cached_inodes before answering.
 */
#ifndef __COHERENCE_BPF_H
#define __COHERENCE_BPF_H

#include "maps.bpf.h"

static __always_inline void forget_inode(struct inode *inode)
{
	struct fs_inode_key k = {};

	if (!inode)
		return;
	k.ino = inode->i_ino;
	k.dev = inode->i_sb->s_dev;
	if (bpf_map_delete_elem(&cached_inodes, &k) == 0)
		stat_inc(FS_STAT_INVALIDATIONS);
}

/* 0 when the file behind entry e is unchanged since user space cached it */
static __always_inline int inode_current(const struct fs_entry *e)
{
	struct fs_inode_key k = {};

	if (!e->ino)
		return 0;	/* an entry without inode tracking */
	k.ino = e->ino;
	k.dev = e->dev;
	return bpf_map_lookup_elem(&cached_inodes, &k) ? 0 : -1;
}

#endif /* __COHERENCE_BPF_H */
