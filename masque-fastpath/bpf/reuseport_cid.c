// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
// Steers the proxy's QUIC packets to the worker that owns their connection: an SK_REUSEPORT
// program attached to the SO_REUSEPORT group of the workers' UDP sockets (one socket per
// worker), loaded and configured by src/steer.rs.
//
// A short-header packet (RFC 9000, section 17.3: the first byte's Header Form bit, 0x80, is 0)
// carries the destination connection ID the proxy chose, right after the first byte; the proxy
// puts a route value in its first two bytes (big-endian). `route_table` maps the route value to
// a worker, `workers` the worker to its socket. Everything else (long headers, which start
// handshakes and carry a client-chosen ID; packets too short; route values whose worker has no
// socket) is left to the kernel's hash of the 4-tuple: the program returns SK_PASS without
// selecting a socket, and `reuseport_select_sock` (net/core/sock_reuseport.c) falls back to it.
//
// An SK_REUSEPORT program sees the packet from its UDP header on: `bpf_skb_load_bytes` offsets
// are relative to the UDP header (`udp4_lib_lookup2` runs the group's program on the skb whose
// data starts there), so the payload starts at offset 8.
//
// Self-contained on purpose (only the kernel's UAPI headers), like dataplane/bpf/xdp_mimiq.c.

#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_skb_load_bytes)(const void *ctx, __u32 offset, void *to, __u32 len) = (void *)26;
static long (*bpf_sk_select_reuseport)(struct sk_reuseport_md *ctx, void *map, void *key,
				       __u64 flags) = (void *)82;

// The UDP header's length (RFC 768).
#define UDP_HEADER_LEN 8
// RFC 9000, section 17.3.1: "Header Form: The most significant bit (0x80) of byte 0 is set to
// 0 for the short header."
#define QUIC_LONG_HEADER 0x80

#define COUNTER_STEERED 0
#define COUNTER_FALLBACK 1

// Route value (the destination connection ID's first two bytes, big-endian) -> worker index.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} route_table SEC(".maps");

// Worker index -> that worker's UDP socket (user space writes the socket's fd as a u64). Sizes
// instead of BTF types: the kernel takes no BTF for socket arrays.
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, 256);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} workers SEC(".maps");

// [COUNTER_STEERED] packets steered by connection ID, [COUNTER_FALLBACK] packets left to the
// kernel's hash.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline int count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &which);
	if (n)
		*n += 1;
	return SK_PASS;
}

SEC("sk_reuseport")
int reuseport_cid(struct sk_reuseport_md *ctx)
{
	// Byte 0 of the QUIC packet, then the first two bytes of the destination connection ID.
	__u8 head[3];
	if (bpf_skb_load_bytes(ctx, UDP_HEADER_LEN, head, sizeof(head)) < 0)
		return count(COUNTER_FALLBACK);
	if (head[0] & QUIC_LONG_HEADER)
		return count(COUNTER_FALLBACK);
	__u32 route = ((__u32)head[1] << 8) | head[2];
	__u32 *worker = bpf_map_lookup_elem(&route_table, &route);
	if (!worker)
		return count(COUNTER_FALLBACK);
	__u32 key = *worker;
	if (bpf_sk_select_reuseport(ctx, &workers, &key, 0) < 0)
		return count(COUNTER_FALLBACK);
	return count(COUNTER_STEERED);
}

char _license[] SEC("license") = "Dual BSD/GPL";
