/* SPDX-License-Identifier: GPL-2.0 */
/* Constants vmlinux.h cannot carry (they are #defines in the kernel's uapi). */
#ifndef __NET_BPF_H
#define __NET_BPF_H

#define TC_ACT_UNSPEC	(-1)
#define TC_ACT_OK	0
#define TC_ACT_SHOT	2

#define ETH_P_IP	0x0800
#define ETH_P_IPV6	0x86DD
#define ETH_ALEN	6

#define IPPROTO_TCP_NR	6
#define IP_DF		0x4000
#define IP_MF		0x2000
#define IP_OFFSET	0x1FFF
#define IP_ECN_MASK	3
#define IP_ECN_CE	3

#define TCP_FLAG_FIN	0x01
#define TCP_FLAG_SYN	0x02
#define TCP_FLAG_RST	0x04
#define TCP_FLAG_PSH	0x08
#define TCP_FLAG_ACK	0x10
#define TCP_FLAG_URG	0x20
#define TCP_FLAG_ECE	0x40
#define TCP_FLAG_CWR	0x80

#define TCPOPT_EOL	0
#define TCPOPT_NOP	1
#define TCPOPT_MSS	2
#define TCPOPT_WINDOW	3
#define TCPOPT_SACK_PERM 4
#define TCPOPT_SACK	5
#define TCPOPT_TIMESTAMP 8

#endif /* __NET_BPF_H */
