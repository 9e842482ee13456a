//! The MIMIQ single box in one pass: the access and the edge role of one host in one worker.
//!
//! Run as two workers, a packet of the single box crosses four AF_XDP sockets and the veth pair
//! between the roles (the access switch's uplink and the edge's inside port). Here the edge
//! stage follows the access stage in the same burst, in memory: what the access switch
//! forwards to its uplink goes through the edge's inside-port path, and what the edge forwards
//! inside goes through the access switch's uplink path, with the same code, tables and drop
//! reasons as over the veth pair (the IP-in-IP tunnel included, so the packets that leave are
//! the same bytes). The two ports of the internal link stay open: what arrives on them from
//! outside the process is handled as before.
//!
//! Ports: the access switch's, in its order (client ports, then the uplink), then the edge's
//! from `edge_base` (inside, outside).

use super::mimiq::{Access, Edge, SwitchUpdate};
use super::{DropReason, Pipeline, Verdict};
use crate::port::{FrameMemory, PortId};

/// The edge's own port numbers (`EdgeConfig::inside` and `outside` of the edge it is given).
const EDGE_INSIDE: PortId = 0;

/// The access and edge roles in one worker.
pub struct SingleBox {
    access: Access,
    edge: Edge,
    /// The access switch's uplink: what goes there enters the edge stage.
    uplink: PortId,
    /// The worker's port number of the edge's port 0.
    edge_base: PortId,
}

impl SingleBox {
    /// Joins `access` (ports 0 ..= `uplink`) and `edge`, whose config numbers its inside port 0
    /// and its outside port 1; the edge's ports become `uplink + 1` and `uplink + 2`.
    pub fn new(access: Access, uplink: PortId, edge: Edge) -> Self {
        SingleBox {
            access,
            edge,
            uplink,
            edge_base: uplink + 1,
        }
    }

    /// The worker's port number of the edge's outside port.
    pub fn outside(&self) -> PortId {
        self.edge_base + 1
    }

    /// The access stage (tests read its tables).
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The edge stage.
    pub fn edge(&self) -> &Edge {
        &self.edge
    }
}

/// A verdict of the second stage: the slow path of the first stage's port cannot answer for
/// the second stage, so what would go there is dropped (neither stage hands the other a frame
/// its slow path would want: both pass on IP only).
fn second_stage(verdict: Verdict) -> Verdict {
    match verdict {
        Verdict::ToSlowPath => Verdict::Drop(DropReason::NotIp),
        v => v,
    }
}

impl Pipeline for SingleBox {
    type Update = SwitchUpdate;

    fn apply(&mut self, update: SwitchUpdate) {
        match update {
            SwitchUpdate::Rule(rule) => {
                self.access.apply(SwitchUpdate::Rule(rule.clone()));
                self.edge.apply(SwitchUpdate::Rule(rule));
            }
            next_hop @ SwitchUpdate::NextHopMac(_) => self.edge.apply(next_hop),
        }
    }

    fn tick(&mut self, now_ms: u64) {
        self.access.tick(now_ms);
        self.edge.tick(now_ms);
    }

    fn process<M: FrameMemory>(
        &mut self,
        in_port: PortId,
        memory: &mut M,
        frames: &mut [M::Frame],
        verdicts: &mut Vec<Verdict>,
    ) {
        let first = verdicts.len();
        if in_port < self.edge_base {
            self.access.process(in_port, memory, frames, verdicts);
            for (frame, verdict) in frames.iter_mut().zip(&mut verdicts[first..]) {
                if *verdict == Verdict::Forward(self.uplink) {
                    let len = memory.len(frame);
                    *verdict = match self.edge.verdict(EDGE_INSIDE, memory, frame, len) {
                        Verdict::Forward(out) => Verdict::Forward(self.edge_base + out),
                        v => second_stage(v),
                    };
                }
            }
        } else {
            let edge_port = in_port - self.edge_base;
            self.edge.process(edge_port, memory, frames, verdicts);
            for (frame, verdict) in frames.iter_mut().zip(&mut verdicts[first..]) {
                *verdict = match *verdict {
                    Verdict::Forward(EDGE_INSIDE) => {
                        let len = memory.len(frame);
                        second_stage(self.access.downstream_verdict(memory, frame, len))
                    }
                    Verdict::Forward(out) => Verdict::Forward(self.edge_base + out),
                    v => v,
                };
            }
        }
    }
}
