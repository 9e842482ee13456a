//! A bare AF_XDP reflector (`gen reflect`): the ceiling of AF_XDP forwarding on a machine,
//! which any pipeline's figure is measured against (`mimiq-perf bench forwarding`).
//!
//! Frames received on one port leave on the other (with one port, on the same one) by
//! descriptor, untouched and uncounted per packet: no parse, no verdict, no per-frame counter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mimiq_dataplane::port::xsk::{self, XskConfig};
use mimiq_dataplane::port::{Port, XdpStats};
use serde::Serialize;

use super::cpu_time_ms;

/// Runs the reflector on queue 0 of `ifaces` (one or two) until `stop`; `ready` is called once
/// the sockets are bound.
pub fn run(
    ifaces: &[String],
    xsk_config: &XskConfig,
    busy: bool,
    stop: &AtomicBool,
    ready: &mut dyn FnMut(),
) -> Result<ReflectReport, xsk::OpenError> {
    let queues: Vec<(String, u32)> = ifaces.iter().map(|i| (i.clone(), 0)).collect();
    let (mut ports, mut memory, mut free) = xsk::open(&queues, xsk_config)?;
    ready();
    let n = ports.len();
    let mut burst = Vec::with_capacity(64);
    let (mut forwarded, mut dropped) = (0u64, 0u64);
    let mut idle_polls = 0u32;
    let cpu0 = cpu_time_ms();
    while !stop.load(Ordering::Relaxed) {
        let mut got = 0;
        for i in 0..n {
            let k = ports[i].rx_burst(&mut burst, 64);
            if k == 0 {
                continue;
            }
            got += k;
            let out = if n == 1 { 0 } else { i ^ 1 };
            forwarded += ports[out].tx_burst(&mut burst) as u64;
            dropped += burst.len() as u64;
            free.append(&mut burst);
        }
        for p in ports.iter_mut() {
            p.reclaim(&mut free);
        }
        if got == 0 {
            idle_polls = idle_polls.saturating_add(1);
            if !busy && idle_polls > 256 {
                <xsk::XskPort as Port>::wait_rx(&mut ports, Duration::from_millis(10));
            }
        } else {
            idle_polls = 0;
        }
    }
    let _ = &mut memory; // frames are moved by descriptor only; the memory is never touched
    let cpu1 = cpu_time_ms();
    Ok(ReflectReport {
        forwarded_packets: forwarded,
        dropped_packets: dropped,
        xdp: ports.iter().map(Port::xdp_stats).collect(),
        cpu_user_ms: cpu1.0 - cpu0.0,
        cpu_sys_ms: cpu1.1 - cpu0.1,
    })
}

/// What the reflector did.
#[derive(Debug, Clone, Serialize)]
pub struct ReflectReport {
    /// Frames queued for transmission.
    pub forwarded_packets: u64,
    /// Frames dropped because the TX ring was full.
    pub dropped_packets: u64,
    /// Kernel socket statistics per port, in `--port` order.
    pub xdp: Vec<Option<XdpStats>>,
    /// CPU time, user, ms.
    pub cpu_user_ms: u64,
    /// CPU time, system, ms.
    pub cpu_sys_ms: u64,
}
