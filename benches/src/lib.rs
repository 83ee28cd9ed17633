//! Benchmarks of chatsim's hot paths (`cargo bench -p benches`): see `benches/hot_paths.rs`.
//! Load and soak drivers for the real build come with issue 5.
