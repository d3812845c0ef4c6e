// SPDX-License-Identifier: GPL-2.0
/* TC ingress fast path of the file server, and an XDP counter. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "net.bpf.h"
#include "maps.bpf.h"

/* Set by user space before load. */
const volatile __u16 server_port = 8080;

SEC("tc")
int fileserver_ingress(struct __sk_buff *skb)
{
	stat_inc(FS_STAT_PACKETS);
	return TC_ACT_OK;
}

SEC("xdp")
int fileserver_xdp(struct xdp_md *ctx)
{
	stat_inc(FS_STAT_XDP_PACKETS);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
