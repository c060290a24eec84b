//! Q-Align's pure logic, with no ML dependencies: score↔level conversion (paper Eq. 1–4),
//! correlation metrics, label-file readers, the training syllabus and evaluation.
