//! Compiles `src/shim.cpp` against the headers of the libtorch that torch-sys links, when
//! that libtorch has CUDA and NCCL (the PyPI wheel: `torch/include`, and the CUDA and NCCL
//! headers of its `nvidia/` packages). Otherwise the crate builds without NCCL and says why
//! at run time (`cfg(nccl)` unset, `LAYERWISE_NCCL_MISSING` holding the reason).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rustc-check-cfg=cfg(nccl)");
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match find() {
        Ok(found) => build(&found),
        Err(why) => {
            println!("cargo:warning=layerwise-nccl builds without NCCL: {why}");
            println!("cargo:rustc-env=LAYERWISE_NCCL_MISSING={why}");
        }
    }
}

struct Found {
    lib: PathBuf,
    includes: Vec<PathBuf>,
}

fn find() -> Result<Found, String> {
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").map_err(|_| "torch-sys did not say where libtorch is".to_string())?,
    );
    if !lib.join("libtorch_cuda.so").exists() {
        return Err(format!("this libtorch ({}) has no CUDA (no libtorch_cuda.so)", lib.display()));
    }
    let torch = lib.parent().ok_or("libtorch's lib folder has no parent")?;
    let site = torch.parent().ok_or("torch's folder has no parent")?;
    let mut includes = vec![torch.join("include"), torch.join("include/torch/csrc/api/include")];
    // The wheel's CUDA packages install their headers into one nvidia/cuNN/include (the
    // runtime's, and those of nvidia-cuda-cccl and nvidia-cuda-crt that setup.sh adds).
    let cuda = std::fs::read_dir(site.join("nvidia"))
        .map_err(|e| format!("{}: {e}", site.join("nvidia").display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("include")))
        .find(|p| p.join("cuda_runtime_api.h").exists())
        .ok_or_else(|| format!("no CUDA runtime headers under {}", site.join("nvidia").display()))?;
    for needed in ["crt/host_config.h", "nv/target"] {
        if !cuda.join(needed).exists() {
            return Err(format!(
                "{} lacks {needed} (pip packages nvidia-cuda-crt and nvidia-cuda-cccl; scripts/setup.sh installs them)",
                cuda.display()
            ));
        }
    }
    includes.push(cuda);
    let nccl = site.join("nvidia/nccl/include");
    if !nccl.join("nccl.h").exists() {
        return Err(format!("no nccl.h in {}", nccl.display()));
    }
    includes.push(nccl);
    for p in &includes {
        if !Path::new(p).exists() {
            return Err(format!("{} is missing", p.display()));
        }
    }
    Ok(Found { lib, includes })
}

fn build(found: &Found) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("src/shim.cpp")
        .flag("-std=c++17")
        .define("USE_C10D_NCCL", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .extra_warnings(false);
    for p in &found.includes {
        b.include(p);
    }
    b.compile("layerwise_nccl_shim");
    println!("cargo:rustc-link-search=native={}", found.lib.display());
    for l in ["torch_cuda", "torch_cpu", "c10_cuda", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-cfg=nccl");
}
