// Generates the Rust code for proto/shoal.proto with a vendored protoc, so a fresh machine
// needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; tonic-prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/shoal.proto");
    println!("cargo:rerun-if-changed=proto/etcd_bench.proto");
    tonic_prost_build::configure()
        .bytes(".shoal.v1.Chunk.data")
        .compile_protos(&["proto/shoal.proto", "proto/etcd_bench.proto"], &["proto"])?;
    Ok(())
}
