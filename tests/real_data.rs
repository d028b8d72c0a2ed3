//! The real Fashion-MNIST from Debian's package reads whole and right.

use layerwise_data::DataConfig;

#[test]
fn real_fashion_mnist_has_its_counts_shape_and_balanced_labels() {
    let splits = layerwise_data::load(&DataConfig::default()).expect("scripts/setup.sh installs dataset-fashion-mnist");
    assert_eq!(splits.train.len(), 60_000);
    assert_eq!(splits.test.len(), 10_000);
    assert_eq!(splits.train.image_shape(), (1, 28, 28));
    assert_eq!(splits.train.label_histogram(), vec![6000; 10]);
    assert_eq!(splits.test.label_histogram(), vec![1000; 10]);
    let mean = splits.train.images.to_kind(tch::Kind::Double).mean(tch::Kind::Double).double_value(&[]) / 255.0;
    assert!((mean - 0.286).abs() < 0.001, "pixel mean {mean}, the normalisation constant is 0.286");
}
