//! Compiles proto/ with protox (no protoc needed) into tonic stubs and a descriptor set for reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/nerve/v1/event.proto",
        "proto/nerve/v1/event_bus.proto",
        "proto/nerve/v1/admin.proto",
        "proto/io/cloudevents/v1/cloudevents.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("nerve_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
