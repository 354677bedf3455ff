//! `pvmm`: see `vmm::cli`.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    std::process::exit(vmm::cli::main_with_args(std::env::args_os()));
}
