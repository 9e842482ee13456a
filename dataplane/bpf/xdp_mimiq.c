// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
// mimiq's XDP program: every frame goes to the AF_XDP socket of its RX queue, except what the
// switch's role leaves to the kernel (`pass_flags`): ARP, IPv6 neighbour discovery, and frames
// for the host's own addresses (`kernel_v4`, `kernel_v6`). A queue without a socket passes to
// the kernel too. With `udp_port` set (the MASQUE proxy's AF_XDP datapath), only UDP datagrams
// to that port, over IPv4 or IPv6 without extension headers, go to the socket; everything else
// (ARP, neighbour discovery, ICMP, other ports, fragments) goes to the kernel.
//
// Self-contained on purpose (only the kernel's UAPI headers): the few libbpf macros it needs
// are defined below, so the build needs clang and linux-libc-dev, not libbpf-dev.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <linux/udp.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)51;
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;

#define PASS_ARP 1u
#define PASS_ND 2u

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} pass_flags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} kernel_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} udp_port SEC(".maps");

// UDP port mode: the socket gets the UDP datagrams to `port` (network order), the kernel the rest.
static __always_inline int udp_port_only(struct xdp_md *ctx, __u16 port)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
			return XDP_PASS;
		// Fragments (MF set or an offset) go to the kernel, which reassembles them.
		if (ip->frag_off & __builtin_bswap16(0x3fff))
			return XDP_PASS;
		udp = (void *)(ip + 1);
	} else if (eth->h_proto == __builtin_bswap16(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_UDP)
			return XDP_PASS;
		udp = (void *)(ip6 + 1);
	} else {
		return XDP_PASS;
	}
	if ((void *)(udp + 1) > end || udp->dest != port)
		return XDP_PASS;
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct in6_addr);
	__type(value, __u8);
} kernel_v6 SEC(".maps");

SEC("xdp")
int xdp_mimiq(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;
	__u32 *flags = bpf_map_lookup_elem(&pass_flags, &zero);
	__u32 pass = flags ? *flags : 0;
	__u32 *only = bpf_map_lookup_elem(&udp_port, &zero);

	if (only && *only)
		return udp_port_only(ctx, (__u16)*only);

	if ((void *)(eth + 1) > end)
		goto to_socket;
	if (eth->h_proto == __builtin_bswap16(ETH_P_ARP)) {
		if (pass & PASS_ARP)
			return XDP_PASS;
	} else if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			goto to_socket;
		if (bpf_map_lookup_elem(&kernel_v4, &ip->daddr))
			return XDP_PASS;
	} else if (eth->h_proto == __builtin_bswap16(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			goto to_socket;
		if (ip6->nexthdr == IPPROTO_ICMPV6 && (pass & PASS_ND)) {
			struct icmp6hdr *icmp = (void *)(ip6 + 1);
			if ((void *)(icmp + 1) > end)
				goto to_socket;
			// Router solicitation .. redirect (133..137).
			if (icmp->icmp6_type >= 133 && icmp->icmp6_type <= 137)
				return XDP_PASS;
		}
		if (bpf_map_lookup_elem(&kernel_v6, &ip6->daddr))
			return XDP_PASS;
	}
to_socket:
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
