//! Order statistics for the benches that report medians of several runs
//! (`e2e`, `spool`), so that both read an even set the same way.

/// The middle value, or the mean of the two middle ones: an even set's
/// upper middle alone overstates it.
pub fn median(v: &mut [f64]) -> f64 {
    quantile(v, 1, 2)
}

/// The `num/den` quantile of `v`, interpolated between the two nearest
/// ranks (R's default, type 7), so the quartiles of an even set are not
/// biased towards one end; NaN for no values.
pub fn quantile(v: &mut [f64], num: usize, den: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = (v.len() - 1) as f64 * num as f64 / den as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}
