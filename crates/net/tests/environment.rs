//! In a process of its own (changing the environment while other tests' threads read it
//! would race): the secret from LAYERWISE_SECRET is kept for `load_secret` and taken out of
//! the environment, so that no child process inherits it.

use layerwise_net::secret::{load_secret, take_from_environment};

#[test]
fn the_environment_secret_is_kept_and_no_child_inherits_it() {
    std::env::set_var("LAYERWISE_SECRET", "a secret from the environment");
    take_from_environment();
    assert!(std::env::var_os("LAYERWISE_SECRET").is_none());
    assert_eq!(load_secret(None).unwrap(), b"a secret from the environment");
    let child = std::process::Command::new("sh").args(["-c", "printf %s \"$LAYERWISE_SECRET\""]).output().unwrap();
    assert!(child.stdout.is_empty(), "{:?}", String::from_utf8_lossy(&child.stdout));
}
