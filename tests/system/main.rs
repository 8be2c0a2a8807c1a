//! System tests: real processes (the launcher, the broker, peers) over real TCP on free ports.

mod demo;
mod faults;
mod room;
mod support;
