// Lloyd-Max codebooks: cell integrals of the two coordinate densities and a Newton
// solver for the boundary fixed point. See docs/codebook.md for the math.
//
// Internally everything is solved in standardised units s = x * sqrt(d), where the
// Gaussian density is N(0, 1) and E[S^2] = 1 for both densities; the results are
// scaled by 1/sqrt(d) at the end.
#include "rotorquant/codebook.hpp"

#include <algorithm>
#include <cmath>
#include <future>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "rotorquant/error.hpp"
#include "rotorquant/parallel.hpp"

namespace rotorquant {

CodebookDensity parse_codebook_density(const std::string& name) {
  if (name == "sphere") return CodebookDensity::kSphere;
  if (name == "gaussian") return CodebookDensity::kGaussian;
  throw TypeError(detail::expected_got("codebook density", "\"sphere\" or \"gaussian\"", "\"" + name + "\""));
}

const char* codebook_density_name(CodebookDensity density) {
  switch (density) {
    case CodebookDensity::kSphere:
      return "sphere";
    case CodebookDensity::kGaussian:
      return "gaussian";
  }
  throw TypeError(detail::expected_got("codebook density", "kSphere or kGaussian",
                                       std::to_string(static_cast<int>(density))));
}

namespace {

constexpr double kPi = 3.14159265358979323846264338327950288;
constexpr double kInvSqrt2Pi = 0.39894228040143267793994605993438187;
constexpr double kSqrt1_2 = 0.70710678118654752440084436210484904;

// Nodes and weights of the n-point Gauss-Legendre rule on [-1, 1], by Newton's method on
// the Legendre polynomial (three-term recurrence).
struct GaussLegendre {
  static constexpr int kPoints = 10;
  double nodes[kPoints];
  double weights[kPoints];

  GaussLegendre() {
    const int n = kPoints;
    for (int i = 0; i < n; ++i) {
      double x = std::cos(kPi * (i + 0.75) / (n + 0.5));
      double derivative = 1.0;
      for (int iteration = 0; iteration < 100; ++iteration) {
        double p_previous = 1.0, p = x;
        for (int k = 2; k <= n; ++k) {
          const double p_next = ((2.0 * k - 1.0) * x * p - (k - 1.0) * p_previous) / k;
          p_previous = p;
          p = p_next;
        }
        derivative = n * (x * p - p_previous) / (x * x - 1.0);
        const double step = p / derivative;
        x -= step;
        if (std::fabs(step) < 1e-17) break;
      }
      nodes[i] = x;
      weights[i] = 2.0 / ((1.0 - x * x) * derivative * derivative);
    }
  }
};

const GaussLegendre& gauss_legendre() {
  static const GaussLegendre rule;
  return rule;
}

// A coordinate density in standardised units s = x sqrt(d): cell probabilities,
// first moments and the density itself. Cells are [a, b] with a, b in [lower, upper].
class StandardisedDensity {
 public:
  virtual ~StandardisedDensity() = default;
  virtual double lower() const = 0;
  virtual double upper() const = 0;
  virtual double pdf(double s) const = 0;
  // Probability and first moment (integral of s f(s)) of the cell [a, b].
  virtual void cell(double a, double b, double* probability, double* first_moment) const = 0;
};

// exp(k u(a)) - exp(k u(b)) for a monotone-in-|s| log-profile, computed as
// g(near) * (-expm1(log ratio)) with the endpoint of smaller |s| factored out, so that
// narrow cells keep full relative accuracy. log_ratio(near, far) must return
// k (u(far) - u(near)) <= 0.
template <typename Profile, typename LogRatio>
double profile_difference(double a, double b, Profile profile, LogRatio log_ratio) {
  if (std::fabs(a) <= std::fabs(b)) return profile(a) * -std::expm1(log_ratio(a, b));
  return -(profile(b) * -std::expm1(log_ratio(b, a)));
}

// N(0, 1).
class StandardGaussian final : public StandardisedDensity {
 public:
  double lower() const override { return -std::numeric_limits<double>::infinity(); }
  double upper() const override { return std::numeric_limits<double>::infinity(); }
  double pdf(double s) const override { return kInvSqrt2Pi * std::exp(-0.5 * s * s); }

  void cell(double a, double b, double* probability, double* first_moment) const override {
    // Phi(b) - Phi(a) from the erfc tail on the side the cell lies, erf across zero.
    if (a >= 0.0) {
      *probability = 0.5 * (std::erfc(a * kSqrt1_2) - std::erfc(b * kSqrt1_2));
    } else if (b <= 0.0) {
      *probability = 0.5 * (std::erfc(-b * kSqrt1_2) - std::erfc(-a * kSqrt1_2));
    } else {
      *probability = 0.5 * (std::erf(b * kSqrt1_2) - std::erf(a * kSqrt1_2));
    }
    // integral of s phi(s) over [a, b] = phi(a) - phi(b).
    const auto profile = [](double s) { return std::exp(-0.5 * s * s); };
    const auto log_ratio = [](double near, double far) {
      if (std::isinf(far)) return -std::numeric_limits<double>::infinity();
      return -0.5 * (far - near) * (far + near);
    };
    *first_moment = kInvSqrt2Pi * profile_difference(a, b, profile, log_ratio);
  }
};

// The exact density of a coordinate of a uniform unit vector in R^d, in s = x sqrt(d).
// With x = sin(theta): f_x(x) dx = cos(theta)^(d-2) dtheta / Z, smooth in theta even for
// d = 2 (arcsine law), so probabilities use composite Gauss-Legendre in theta. First
// moments have the closed form integral of sin cos^(d-2) = -cos^(d-1)/(d-1).
class StandardisedSphere final : public StandardisedDensity {
 public:
  explicit StandardisedSphere(std::int64_t dim)
      : d_(static_cast<double>(dim)), sqrt_d_(std::sqrt(static_cast<double>(dim))) {
    // Subintervals of at most 0.25 / sqrt(d) in theta (the density's width is ~1/sqrt(d)).
    step_ = 0.25 / sqrt_d_;
    // Clip theta where cos^(d-2) < 1e-300 (relative to its peak 1 at theta = 0).
    theta_max_ = 0.5 * kPi;
    if (d_ > 2.0) {
      const double log_floor = std::log(1e-300);  // (d-2) log cos(theta_max) = log_floor
      theta_max_ = std::min(theta_max_, std::acos(std::exp(log_floor / (d_ - 2.0))));
    }
    normalisation_ = 1.0;
    normalisation_ = unnormalised_integral(-theta_max_, theta_max_);
  }

  double lower() const override { return -sqrt_d_; }
  double upper() const override { return sqrt_d_; }

  // f_s(s) = f_x(s / sqrt d) / sqrt d, f_x(x) = (1 - x^2)^((d-3)/2) / Z.
  double pdf(double s) const override {
    const double x = s / sqrt_d_;
    if (std::fabs(x) >= 1.0) return 0.0;  // only evaluated at interior boundaries
    return std::exp(0.5 * (d_ - 3.0) * std::log1p(-x * x)) / normalisation_ / sqrt_d_;
  }

  void cell(double a, double b, double* probability, double* first_moment) const override {
    const double xa = clamp_unit(a / sqrt_d_), xb = clamp_unit(b / sqrt_d_);
    const double theta_a = std::max(std::asin(xa), -theta_max_);
    const double theta_b = std::min(std::asin(xb), theta_max_);
    *probability = theta_b > theta_a ? unnormalised_integral(theta_a, theta_b) / normalisation_ : 0.0;
    // integral over [xa, xb] of x f_x = (cos^(d-1)(theta_a) - cos^(d-1)(theta_b)) / ((d-1) Z),
    // cos^(d-1)(theta) = (1 - x^2)^((d-1)/2).
    const double half_power = 0.5 * (d_ - 1.0);
    const auto profile = [half_power](double x) {
      if (std::fabs(x) >= 1.0) return 0.0;
      return std::exp(half_power * std::log1p(-x * x));
    };
    const auto log_ratio = [half_power](double near, double far) {
      // log((1 - far^2) / (1 - near^2)) = log1p((near - far)(near + far) / (1 - near^2)).
      if (std::fabs(far) >= 1.0) return -std::numeric_limits<double>::infinity();  // the end x = +-1
      const double ratio = std::max((near - far) * (near + far) / (1.0 - near * near), -1.0);
      return half_power * std::log1p(ratio);
    };
    const double moment_x = profile_difference(xa, xb, profile, log_ratio) / ((d_ - 1.0) * normalisation_);
    *first_moment = moment_x * sqrt_d_;
  }

 private:
  static double clamp_unit(double x) { return std::min(1.0, std::max(-1.0, x)); }

  // log cos(theta), accurate near 0 (log1p of -sin^2) and near pi/2 (log of cos).
  static double log_cos(double theta) {
    if (std::fabs(theta) < 0.7) {
      const double s = std::sin(theta);
      return 0.5 * std::log1p(-s * s);
    }
    return std::log(std::cos(theta));
  }

  // integral of cos(theta)^(d-2) over [theta_a, theta_b], composite Gauss-Legendre.
  double unnormalised_integral(double theta_a, double theta_b) const {
    const GaussLegendre& rule = gauss_legendre();
    const double length = theta_b - theta_a;
    const std::int64_t pieces = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(length / step_)));
    const double width = length / static_cast<double>(pieces);
    const double power = d_ - 2.0;
    double total = 0.0;
    for (std::int64_t piece = 0; piece < pieces; ++piece) {
      const double left = theta_a + width * static_cast<double>(piece);
      const double right = piece + 1 == pieces ? theta_b : left + width;
      const double middle = 0.5 * (left + right), half = 0.5 * (right - left);
      double sum = 0.0;
      for (int k = 0; k < GaussLegendre::kPoints; ++k) {
        const double theta = middle + half * rule.nodes[k];
        sum += rule.weights[k] * (power == 0.0 ? 1.0 : std::exp(power * log_cos(theta)));
      }
      total += sum * half;
    }
    return total;
  }

  double d_;
  double sqrt_d_;
  double step_ = 0.0;
  double theta_max_ = 0.0;
  double normalisation_ = 1.0;
};

// Inverse of the standard normal CDF: a rational start (Abramowitz-Stegun 26.2.23)
// polished by Newton steps on erfc. Only used for the initial guess.
double standard_normal_quantile(double p) {
  const double tail = std::min(p, 1.0 - p);
  const double t = std::sqrt(-2.0 * std::log(tail));
  double z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) /
                     (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t);
  z = -z;  // quantile of the lower tail
  for (int iteration = 0; iteration < 3; ++iteration) {
    const double cdf = 0.5 * std::erfc(-z * kSqrt1_2);
    const double density = kInvSqrt2Pi * std::exp(-0.5 * z * z);
    if (density <= 0.0) break;
    z -= (cdf - tail) / density;
  }
  return p < 0.5 ? z : -z;
}

struct CellState {
  std::vector<double> probability;  // P_i, size L
  std::vector<double> centroid;     // c_i = M_i / P_i, size L
};

// Cells [t_{i-1}, t_i] with t_{-1} = lower, t_{L-1} = upper.
void evaluate_cells(const StandardisedDensity& density, const std::vector<double>& boundaries,
                    CellState* state) {
  const std::size_t levels = boundaries.size() + 1;
  state->probability.resize(levels);
  state->centroid.resize(levels);
  for (std::size_t i = 0; i < levels; ++i) {
    const double a = i == 0 ? density.lower() : boundaries[i - 1];
    const double b = i + 1 == levels ? density.upper() : boundaries[i];
    double probability = 0.0, moment = 0.0;
    density.cell(a, b, &probability, &moment);
    state->probability[i] = probability;
    double centroid = probability > 0.0 ? moment / probability : 0.0;
    // A cell of (numerically) zero mass: keep the centroid inside it.
    if (!(probability > 0.0) || !std::isfinite(centroid) || centroid < a || centroid > b) {
      const double lo = std::isfinite(a) ? a : b - 1.0;
      const double hi = std::isfinite(b) ? b : a + 1.0;
      centroid = std::min(std::max(centroid, lo), hi);
      if (!(probability > 0.0) || !std::isfinite(centroid)) centroid = 0.5 * (lo + hi);
    }
    state->centroid[i] = centroid;
  }
}

double fixed_point_residual(const std::vector<double>& boundaries, const CellState& state,
                            std::vector<double>* residual) {
  double largest = 0.0;
  residual->resize(boundaries.size());
  for (std::size_t j = 0; j < boundaries.size(); ++j) {
    (*residual)[j] = boundaries[j] - 0.5 * (state.centroid[j] + state.centroid[j + 1]);
    largest = std::max(largest, std::fabs((*residual)[j]));
  }
  return largest;
}

bool strictly_increasing_inside(const std::vector<double>& t, double lower, double upper) {
  double previous = lower;
  for (double value : t) {
    if (!(value > previous)) return false;
    previous = value;
  }
  return previous < upper;
}

// Both densities are even, so the solution is antisymmetric: t_j = -t_{L-2-j}. Imposing it
// on every iterate removes the nearly singular asymmetric (shift) modes of the Jacobian.
void symmetrise(std::vector<double>* boundaries) {
  std::vector<double>& t = *boundaries;
  const std::size_t count = t.size();
  for (std::size_t j = 0; j < count / 2; ++j) {
    const double magnitude = 0.5 * (t[count - 1 - j] - t[j]);
    t[j] = -magnitude;
    t[count - 1 - j] = magnitude;
  }
  t[count / 2] = 0.0;
}

// Solves the Lloyd-Max fixed point t_j = (c_j + c_{j+1}) / 2 in standardised units.
std::vector<double> solve_boundaries(const StandardisedDensity& density, int levels) {
  const std::size_t count = static_cast<std::size_t>(levels - 1);
  // Compander start: centroids at quantiles of N(0, 3), boundaries at midpoints; mapped
  // into the density's support (a no-op for large d) by u -> R tanh(u / R).
  std::vector<double> start(static_cast<std::size_t>(levels));
  for (int i = 0; i < levels; ++i)
    start[static_cast<std::size_t>(i)] = std::sqrt(3.0) * standard_normal_quantile((i + 0.5) / levels);
  std::vector<double> t(count);
  for (std::size_t j = 0; j < count; ++j) {
    double value = 0.5 * (start[j] + start[j + 1]);
    if (std::isfinite(density.upper())) value = density.upper() * std::tanh(value / density.upper());
    t[j] = value;
  }
  t[count / 2] = 0.0;  // exact middle boundary (levels is even)

  CellState state;
  std::vector<double> residual;
  // A few Lloyd steps.
  for (int step = 0; step < 4; ++step) {
    evaluate_cells(density, t, &state);
    for (std::size_t j = 0; j < count; ++j) t[j] = 0.5 * (state.centroid[j] + state.centroid[j + 1]);
    symmetrise(&t);
  }

  evaluate_cells(density, t, &state);
  double norm = fixed_point_residual(t, state, &residual);
  const double tolerance = 1e-15;
  std::vector<double> lower_diag(count), diag(count), upper_diag(count), step(count), trial(count);
  std::vector<double> pdf_at(count);
  CellState trial_state;
  std::vector<double> trial_residual;
  int stalls = 0;
  for (int iteration = 0; iteration < 200 && norm > tolerance; ++iteration) {
    // Jacobian of F_j = t_j - (c_j + c_{j+1}) / 2: tridiagonal, with
    // dc_i/dt_{i-1} = f(t_{i-1}) (c_i - t_{i-1}) / P_i and dc_i/dt_i = f(t_i) (t_i - c_i) / P_i.
    for (std::size_t j = 0; j < count; ++j) pdf_at[j] = density.pdf(t[j]);
    for (std::size_t j = 0; j < count; ++j) {
      const double p_left = state.probability[j], p_right = state.probability[j + 1];
      const double dc_left_dt = p_left > 0.0 ? pdf_at[j] * (t[j] - state.centroid[j]) / p_left : 0.0;
      const double dc_right_dt = p_right > 0.0 ? pdf_at[j] * (state.centroid[j + 1] - t[j]) / p_right : 0.0;
      diag[j] = 1.0 - 0.5 * (dc_left_dt + dc_right_dt);
      lower_diag[j] = j > 0 && p_left > 0.0
                          ? -0.5 * pdf_at[j - 1] * (state.centroid[j] - t[j - 1]) / p_left
                          : 0.0;
      upper_diag[j] = j + 1 < count && p_right > 0.0
                          ? -0.5 * pdf_at[j + 1] * (t[j + 1] - state.centroid[j + 1]) / p_right
                          : 0.0;
      step[j] = -residual[j];
    }
    // Thomas algorithm.
    bool singular = false;
    for (std::size_t j = 1; j < count && !singular; ++j) {
      if (diag[j - 1] == 0.0) {
        singular = true;
        break;
      }
      const double factor = lower_diag[j] / diag[j - 1];
      diag[j] -= factor * upper_diag[j - 1];
      step[j] -= factor * step[j - 1];
    }
    if (!singular && diag[count - 1] != 0.0) {
      step[count - 1] /= diag[count - 1];
      for (std::size_t j = count - 1; j-- > 0;) step[j] = (step[j] - upper_diag[j] * step[j + 1]) / diag[j];
    } else {
      singular = true;
    }
    // Damped Newton: halve the step until the boundaries stay ordered and the residual drops.
    bool accepted = false;
    if (!singular) {
      for (double lambda = 1.0; lambda > 1e-4 && !accepted; lambda *= 0.5) {
        for (std::size_t j = 0; j < count; ++j) trial[j] = t[j] + lambda * step[j];
        symmetrise(&trial);
        if (!strictly_increasing_inside(trial, density.lower(), density.upper())) continue;
        evaluate_cells(density, trial, &trial_state);
        const double trial_norm = fixed_point_residual(trial, trial_state, &trial_residual);
        if (trial_norm < norm) {
          t.swap(trial);
          std::swap(state, trial_state);
          residual.swap(trial_residual);
          norm = trial_norm;
          accepted = true;
        }
      }
    }
    if (!accepted) {
      // At the rounding floor Newton cannot decrease the residual any more: stop there.
      if (norm < 1e-12 || ++stalls > 20) break;
      // Otherwise fall back to one Lloyd step (always keeps the boundaries ordered).
      for (std::size_t j = 0; j < count; ++j) t[j] = 0.5 * (state.centroid[j] + state.centroid[j + 1]);
      symmetrise(&t);
      evaluate_cells(density, t, &state);
      norm = fixed_point_residual(t, state, &residual);
    }
  }
  return t;
}

std::string format_dim_range() {
  return "an integer in [" + std::to_string(LloydMaxCodebook::kMinDim) + ", " +
         std::to_string(LloydMaxCodebook::kMaxDim) + "]";
}

void validate_arguments(std::int64_t dim, int bits, CodebookDensity density) {
  if (dim < LloydMaxCodebook::kMinDim || dim > LloydMaxCodebook::kMaxDim)
    throw ValueError(detail::expected_got("codebook dim", format_dim_range(), std::to_string(dim)));
  if (bits < LloydMaxCodebook::kMinBits || bits > LloydMaxCodebook::kMaxBits)
    throw ValueError(detail::expected_got("codebook bits", "an integer in [1, 8]", std::to_string(bits)));
  if (density != CodebookDensity::kSphere && density != CodebookDensity::kGaussian)
    throw TypeError(detail::expected_got("codebook density", "kSphere or kGaussian",
                                         std::to_string(static_cast<int>(density))));
}

}  // namespace

LloydMaxCodebook::LloydMaxCodebook(std::int64_t dim, int bits, CodebookDensity density)
    : dim_(dim), bits_(bits), density_(density) {
  validate_arguments(dim, bits, density);
  const int count_levels = levels();
  std::unique_ptr<StandardisedDensity> model;
  if (density == CodebookDensity::kGaussian) {
    model = std::make_unique<StandardGaussian>();
  } else {
    model = std::make_unique<StandardisedSphere>(dim);
  }
  const std::vector<double> t = solve_boundaries(*model, count_levels);
  CellState state;
  evaluate_cells(*model, t, &state);

  // Exact symmetry: c_i = -c_{L-1-i}.
  const std::size_t levels_size = static_cast<std::size_t>(count_levels);
  std::vector<double> centroid(levels_size);
  for (std::size_t i = 0; i < levels_size / 2; ++i) {
    const double magnitude = 0.5 * (state.centroid[levels_size - 1 - i] - state.centroid[i]);
    centroid[i] = -magnitude;
    centroid[levels_size - 1 - i] = magnitude;
  }
  // E[S^2] = 1 for both densities, so E[(S - Q(S))^2] = 1 - sum P_i c_i^2 (standardised),
  // which is also the whole-vector total d E[(X - Q(X))^2].
  // Dividing by sum P_i (= 1 up to the quadrature's rounding) cancels a relative error of
  // the normalisation to first order.
  double explained = 0.0, total_probability = 0.0;
  for (std::size_t i = 0; i < levels_size; ++i) {
    explained += state.probability[i] * centroid[i] * centroid[i];
    total_probability += state.probability[i];
  }
  explained /= total_probability;
  const double inverse_sqrt_d = 1.0 / std::sqrt(static_cast<double>(dim));
  mse_per_coordinate_ = (1.0 - explained) / static_cast<double>(dim);

  centroids_.resize(levels_size);
  for (std::size_t i = 0; i < levels_size; ++i) centroids_[i] = centroid[i] * inverse_sqrt_d;
  boundaries_.resize(levels_size - 1);
  for (std::size_t j = 0; j + 1 < levels_size; ++j) boundaries_[j] = 0.5 * (centroids_[j] + centroids_[j + 1]);
  centroids_f32_.assign(centroids_.begin(), centroids_.end());
  boundaries_f32_.assign(boundaries_.begin(), boundaries_.end());

  for (std::size_t i = 0; i + 1 < levels_size; ++i) {
    if (!(centroids_[i] < boundaries_[i] && boundaries_[i] < centroids_[i + 1]) ||
        !(boundaries_f32_[i] > (i == 0 ? -std::numeric_limits<float>::infinity() : boundaries_f32_[i - 1])))
      throw RuntimeError("LloydMaxCodebook: solver produced an unordered codebook for dim " + std::to_string(dim) +
                         ", bits " + std::to_string(bits) + ", density " + codebook_density_name(density));
  }
}

float LloydMaxCodebook::dequantize(int index) const {
  if (index < 0 || index >= levels())
    throw ValueError(detail::expected_got("codebook index", "an integer in [0, " + std::to_string(levels() - 1) + "]",
                                          std::to_string(index)));
  return centroids_f32_[static_cast<std::size_t>(index)];
}

void LloydMaxCodebook::quantize(const float* values, std::uint8_t* indices, std::int64_t n) const {
  if (n < 0) throw ValueError(detail::expected_got("quantize count", "n >= 0", std::to_string(n)));
  if (n == 0) return;
  parallel_for(n, 2 * bits_, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) indices[i] = static_cast<std::uint8_t>(quantize(values[i]));
  });
}

void LloydMaxCodebook::dequantize(const std::uint8_t* indices, float* values, std::int64_t n) const {
  if (n < 0) throw ValueError(detail::expected_got("dequantize count", "n >= 0", std::to_string(n)));
  if (n == 0) return;
  const int count_levels = levels();
  parallel_for(n, 2, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      const int index = indices[i];
      if (index >= count_levels)
        throw ValueError(detail::expected_got("codebook index at position " + std::to_string(i),
                                              "an integer in [0, " + std::to_string(count_levels - 1) + "]",
                                              std::to_string(index)));
      values[i] = centroids_f32_[static_cast<std::size_t>(index)];
    }
  });
}

std::shared_ptr<const LloydMaxCodebook> lloyd_max_codebook(std::int64_t dim, int bits, CodebookDensity density) {
  validate_arguments(dim, bits, density);
  using Key = std::tuple<std::int64_t, int, int>;
  using Entry = std::shared_future<std::shared_ptr<const LloydMaxCodebook>>;
  static std::mutex cache_mutex;
  static std::map<Key, Entry> cache;

  const Key key{dim, bits, static_cast<int>(density)};
  std::promise<std::shared_ptr<const LloydMaxCodebook>> promise;
  Entry entry;
  bool solve_here = false;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto found = cache.find(key);
    if (found != cache.end()) {
      entry = found->second;
    } else {
      entry = promise.get_future().share();
      cache.emplace(key, entry);
      solve_here = true;
    }
  }
  if (solve_here) {
    // Solved outside the lock; concurrent callers for this key wait on the future.
    try {
      promise.set_value(std::make_shared<const LloydMaxCodebook>(dim, bits, density));
    } catch (...) {
      {
        std::lock_guard<std::mutex> lock(cache_mutex);
        cache.erase(key);  // let a later call retry
      }
      promise.set_exception(std::current_exception());
    }
  }
  return entry.get();
}

}  // namespace rotorquant
