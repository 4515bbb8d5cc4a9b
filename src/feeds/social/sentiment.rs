//! A small lexicon sentiment score for short posts.
//!
//! Words carry a valence from -3 to +3 (a short, market-flavoured list
//! written for this project); a negator up to three words before a word
//! flips it, an intensifier just before it strengthens it by half. The sum
//! is squashed into (-1, 1) with `s / sqrt(s² + 15)`, the normalisation
//! VADER uses, so one strong word reads about ±0.6 and many agreeing words
//! approach ±1 without reaching it. It is a cheap signal for dashboards,
//! not a language model: sarcasm and context are beyond it.

/// The score of one post.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sentiment {
    /// In (-1, 1); 0 when no word of the lexicon occurs.
    pub score: f64,
    /// Words in the post (links, mentions and numbers are not words).
    pub words: i64,
}

const LEXICON: &[(&str, f64)] = &[
    // positive
    ("amazing", 3.0),
    ("awesome", 3.0),
    ("best", 3.0),
    ("excellent", 3.0),
    ("fantastic", 3.0),
    ("great", 3.0),
    ("love", 3.0),
    ("soar", 3.0),
    ("soaring", 3.0),
    ("soars", 3.0),
    ("thrilled", 3.0),
    ("better", 2.0),
    ("boom", 2.0),
    ("breakout", 2.0),
    ("bullish", 2.0),
    ("confident", 2.0),
    ("gain", 2.0),
    ("gains", 2.0),
    ("glad", 2.0),
    ("good", 2.0),
    ("growth", 2.0),
    ("happy", 2.0),
    ("impressive", 2.0),
    ("moon", 2.0),
    ("nice", 2.0),
    ("optimistic", 2.0),
    ("outperform", 2.0),
    ("pleased", 2.0),
    ("positive", 2.0),
    ("profit", 2.0),
    ("profits", 2.0),
    ("rallies", 2.0),
    ("rally", 2.0),
    ("strong", 2.0),
    ("success", 2.0),
    ("successful", 2.0),
    ("surge", 2.0),
    ("surges", 2.0),
    ("upgrade", 2.0),
    ("win", 2.0),
    ("winning", 2.0),
    ("wins", 2.0),
    ("wow", 2.0),
    ("beat", 1.0),
    ("buy", 1.0),
    ("hope", 1.0),
    ("record", 1.0),
    ("recover", 1.0),
    ("recovery", 1.0),
    ("rise", 1.0),
    ("rising", 1.0),
    ("safe", 1.0),
    // negative
    ("drop", -1.0),
    ("drops", -1.0),
    ("fall", -1.0),
    ("falling", -1.0),
    ("falls", -1.0),
    ("inflation", -1.0),
    ("problem", -1.0),
    ("problems", -1.0),
    ("risk", -1.0),
    ("sell", -1.0),
    ("uncertain", -1.0),
    ("uncertainty", -1.0),
    ("volatile", -1.0),
    ("bad", -2.0),
    ("bearish", -2.0),
    ("broke", -2.0),
    ("disappointed", -2.0),
    ("disappointing", -2.0),
    ("downgrade", -2.0),
    ("dump", -2.0),
    ("dumping", -2.0),
    ("fail", -2.0),
    ("failed", -2.0),
    ("failure", -2.0),
    ("fear", -2.0),
    ("lawsuit", -2.0),
    ("lose", -2.0),
    ("losing", -2.0),
    ("loss", -2.0),
    ("losses", -2.0),
    ("negative", -2.0),
    ("recession", -2.0),
    ("risky", -2.0),
    ("sad", -2.0),
    ("selloff", -2.0),
    ("ugly", -2.0),
    ("underperform", -2.0),
    ("weak", -2.0),
    ("worried", -2.0),
    ("worry", -2.0),
    ("worse", -2.0),
    ("angry", -3.0),
    ("awful", -3.0),
    ("bankrupt", -3.0),
    ("bankruptcy", -3.0),
    ("collapse", -3.0),
    ("collapsed", -3.0),
    ("crash", -3.0),
    ("crashes", -3.0),
    ("crashing", -3.0),
    ("fraud", -3.0),
    ("hack", -3.0),
    ("hacked", -3.0),
    ("hate", -3.0),
    ("horrible", -3.0),
    ("panic", -3.0),
    ("plunge", -3.0),
    ("plunges", -3.0),
    ("rekt", -3.0),
    ("scam", -3.0),
    ("terrible", -3.0),
    ("worst", -3.0),
];

const NEGATORS: &[&str] = &[
    "not", "no", "never", "nor", "cannot", "dont", "don't", "isnt", "isn't", "wasnt", "wasn't",
    "cant", "can't", "wont", "won't", "aint", "ain't", "without",
];

const INTENSIFIERS: &[&str] = &[
    "very",
    "really",
    "extremely",
    "so",
    "super",
    "incredibly",
    "totally",
    "hugely",
];

fn valence(word: &str) -> Option<f64> {
    // A linear scan of ~120 short words: cheaper than posts arrive.
    LEXICON.iter().find(|(w, _)| *w == word).map(|(_, v)| *v)
}

/// Scores `text`.
pub fn score(text: &str) -> Sentiment {
    let mut words = 0i64;
    let mut sum = 0.0;
    // Words since the last negator (None: no negator in reach).
    let mut negated: Option<u8> = None;
    let mut boost = 1.0;
    for raw in text.split_whitespace() {
        if raw.starts_with("http://") || raw.starts_with("https://") || raw.starts_with('@') {
            continue;
        }
        let w: String = raw
            .trim_start_matches(['#', '$'])
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '\'')
            .flat_map(char::to_lowercase)
            .collect();
        let w = w.trim_matches('\'');
        if !w.chars().any(char::is_alphabetic) {
            continue;
        }
        words += 1;
        if NEGATORS.contains(&w) {
            negated = Some(0);
            continue;
        }
        if INTENSIFIERS.contains(&w) {
            boost = 1.5;
            continue;
        }
        if let Some(v) = valence(w) {
            let sign = if negated.is_some() { -1.0 } else { 1.0 };
            sum += sign * v * boost;
            negated = None;
        } else if let Some(n) = negated.as_mut() {
            *n += 1;
            if *n >= 3 {
                negated = None;
            }
        }
        boost = 1.0;
    }
    let score = sum / (sum * sum + 15.0).sqrt();
    Sentiment { score, words }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexicon_words_are_unique() {
        let mut w: Vec<&str> = LEXICON.iter().map(|(w, _)| *w).collect();
        let n = w.len();
        w.sort();
        w.dedup();
        assert_eq!(w.len(), n);
    }

    #[test]
    fn scores_follow_the_words() {
        let up = score("Bitcoin rally looks strong, very bullish! https://t.co/x @someone");
        assert!(up.score > 0.8, "{up:?}");
        assert_eq!(up.words, 6);
        let down = score("Markets crash, investors panic");
        assert!(down.score < -0.8, "{down:?}");
        let neutral = score("The meeting is at 10:00 today");
        assert_eq!(neutral.score, 0.0);
        assert_eq!(neutral.words, 5);
        let negated = score("this is not good");
        assert!(negated.score < 0.0, "{negated:?}");
        let far = score("not that I care about the good news");
        assert!(far.score > 0.0, "negation fades after three words: {far:?}");
        assert!(score("very good").score > score("good").score);
        assert_eq!(score("").words, 0);
        assert!((-1.0..1.0).contains(&score(&"great ".repeat(1000)).score));
    }
}
