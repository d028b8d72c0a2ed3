//! What every thread of a stage, the loader and calibration does first (its intra-op
//! thread count) and how a panic in one becomes a one-line reason.

/// Gives the calling thread `n` intra-op threads (OpenMP and MKL), for good.
///
/// `at::set_num_threads` alone is not enough in a thread of its own: it also records `n`
/// process-wide, and a thread's first ATen operation re-applies whatever was recorded last
/// (`lazy_init_num_threads`). A stage that set 2 and then saw the loader thread set 1
/// before its first operation ran on one core: the pipelined path lost a third of its
/// speed, more or less from run to run. Reading the count first spends that first-use
/// initialisation, so what is set here is what the thread keeps.
pub fn set_thread_count(n: usize) {
    let _ = tch::get_num_threads();
    tch::set_num_threads(n.clamp(1, i32::MAX as usize) as i32);
}

/// The first line of a panic's message.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into());
    text.lines().next().unwrap_or("panicked").to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    /// The order that slowed every pipelined run: a stage sets its count, another thread sets
    /// a different one before the stage's first operation. The stage must keep its own.
    #[test]
    fn a_thread_keeps_the_count_it_set_when_another_thread_sets_another() {
        let (set_tx, set_rx) = channel();
        let (other_tx, other_rx) = channel();
        let stage = std::thread::spawn(move || {
            super::set_thread_count(3);
            set_tx.send(()).unwrap();
            other_rx.recv().unwrap(); // the other thread has set 1 by now
            let _ = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float);
            tch::get_num_threads()
        });
        set_rx.recv().unwrap();
        std::thread::spawn(|| super::set_thread_count(1)).join().unwrap();
        other_tx.send(()).unwrap();
        assert_eq!(stage.join().unwrap(), 3);
    }

    #[test]
    fn a_panic_becomes_its_first_line() {
        let panic = std::panic::catch_unwind(|| panic!("out of memory\nbacktrace")).unwrap_err();
        assert_eq!(super::panic_message(&*panic), "out of memory");
    }
}
