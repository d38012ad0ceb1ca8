//! The administrator's tool: prices, instances, sweep, doctor, emulator, demo.
fn main() {
    eprintln!("aliyun-spot: not implemented yet");
    std::process::exit(2);
}
