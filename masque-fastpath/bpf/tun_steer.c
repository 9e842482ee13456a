// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
// Picks the queue of a multi-queue TUN device for each packet the host sends into it: the queue
// of the worker serving the packet's destination address. Attached with TUNSETSTEERINGEBPF
// (include/uapi/linux/if_tun.h) and configured by src/steer.rs.
//
// drivers/net/tun.c, `tun_ebpf_select_queue`: the device runs the program as a socket filter
// (`bpf_prog_run_clear_cb`) on the skb being transmitted and takes its return value modulo the
// number of queues. The device is IFF_TUN without packet information, so the skb's data starts
// at the IP header; a socket filter has no direct packet access, so the bytes are read with
// `bpf_skb_load_bytes`, whose offsets are relative to that start.
//
// Self-contained on purpose (only the kernel's UAPI headers), like dataplane/bpf/xdp_mimiq.c.

#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_skb_load_bytes)(const void *ctx, __u32 offset, void *to, __u32 len) = (void *)26;

// RFC 791, section 3.1: the destination address is at offset 16 of the IPv4 header.
#define IPV4_DST_OFFSET 16
// RFC 8200, section 3: the destination address is at offset 24 of the IPv6 header.
#define IPV6_DST_OFFSET 24

// An IPv6 address, or an IPv4 address as an IPv4-mapped IPv6 address (RFC 4291, section
// 2.5.5.2: ::ffff:a.b.c.d).
struct owner_key {
	__u8 addr[16];
};

// Destination address -> queue index.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct owner_key);
	__type(value, __u32);
} owners SEC(".maps");

SEC("socket")
int tun_steer(struct __sk_buff *skb)
{
	struct owner_key key = {};
	__u8 version;

	if (bpf_skb_load_bytes(skb, 0, &version, 1) < 0)
		return 0;
	switch (version >> 4) {
	case 4:
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		if (bpf_skb_load_bytes(skb, IPV4_DST_OFFSET, &key.addr[12], 4) < 0)
			return 0;
		break;
	case 6:
		if (bpf_skb_load_bytes(skb, IPV6_DST_OFFSET, key.addr, 16) < 0)
			return 0;
		break;
	default:
		return 0;
	}
	__u32 *queue = bpf_map_lookup_elem(&owners, &key);
	return queue ? *queue : 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
