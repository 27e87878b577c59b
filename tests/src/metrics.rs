//! Reading allot's `/metrics` (Prometheus text format).

/// The value of one sample (`name{labels}` exactly as rendered, labels in alphabetical order),
/// or 0 if the sample is not there yet.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| {
            value.trim().parse().expect("a sample value is a number")
        })
}

/// The `_sum` and `_count` of histogram `name` (without labels), if it has them.
pub fn sum_and_count(metrics: &str, name: &str) -> Option<(f64, f64)> {
    let value = |series: String| {
        metrics
            .lines()
            .find(|line| line.starts_with(&series))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some((
        value(format!("{name}_sum "))?,
        value(format!("{name}_count "))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_histograms_are_read_by_their_exact_series() {
        let text = "# TYPE a counter\na{x=\"1\"} 3\na{x=\"10\"} 5\nh_sum 12.5\nh_count 5\n";
        assert_eq!(sample(text, "a{x=\"1\"}"), 3.0);
        assert_eq!(sample(text, "a{x=\"10\"}"), 5.0);
        assert_eq!(sample(text, "a{x=\"2\"}"), 0.0);
        assert_eq!(sum_and_count(text, "h"), Some((12.5, 5.0)));
        assert_eq!(sum_and_count(text, "a"), None);
    }
}
