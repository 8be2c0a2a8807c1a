//! `cargo bench -p peer --bench pow`: the mining benchmark ([`peer::bench`]) with default options,
//! printed as a table. Not a criterion bench: each measurement is a second-long hash-rate run
//! against a baseline measured in the same run, which a plain binary reports as well, without
//! the dependency.

fn main() {
    println!("{}", peer::bench::run_bench(&peer::bench::BenchOptions::default()));
}
