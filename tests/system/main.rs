//! System tests: real processes (the launcher, the broker, peers) over real TCP on free ports.

mod auth;
mod chaos;
mod cluster;
mod dashboard;
mod demo;
mod errors;
mod faults;
mod flood;
mod lab;
mod multihost;
mod netns;
mod partition;
mod quorum;
mod rabbitmq;
mod room;
mod scale;
mod status;
mod support;
mod watch;
