// Autograd of the ops. Each csrc/<op>.cpp registers at the Autograd key a
// torch::autograd::Function (as torchvision's ops do): its forward runs the op
// below autograd, its backward calls the op's _<op>_backward for the gradients
// that are needed and no others. A call costs no Python: the levels of a list
// op are not flattened and rebuilt per call, which on a GPU at batch 2 would
// take longer than the op's kernels.
//
// Indexing: ctx->needs_input_grad(i) counts the tensors forward was given, in
// order (a Tensor[] argument one per tensor, an absent Tensor? none). A
// backward returns one entry per argument of forward (a Tensor[] argument one
// per tensor, every other argument one undefined entry): see Grads.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <vector>

namespace tbd_ops {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether any of the tensors forward was given at positions [begin, begin + n) needs a gradient.
inline bool any_needs(const AutogradContext* ctx, size_t begin, size_t n) {
  for (size_t i = begin; i < begin + n; ++i) {
    if (ctx->needs_input_grad(i)) return true;
  }
  return false;
}

// A backward's result, built in the order of forward's arguments. A gradient is
// kept only where its input needs one (`edge`: the input's position among the
// tensors, as for needs_input_grad).
//
// The backward ops have no derivative of their own, so a backward is once
// differentiable: from the Grads' construction on it runs without grad mode,
// and under create_graph=True take() returns the gradients attached to a node
// that raises when a second derivative reaches it (its edges lead to what the
// gradients depend on: the op's inputs and the incoming gradients), instead of
// gradients that silently act as constants in a second derivative.
class Grads {
 public:
  Grads(const AutogradContext* ctx, const variable_list& grad_outputs)
      : ctx_(ctx), grad_outputs_(grad_outputs), create_graph_(at::GradMode::is_enabled()) {
    no_grad_.emplace();
  }
  // An argument with no gradient (a tensor that is a constant of the op, a number, a string, a list).
  Grads& none(size_t n = 1) {
    out_.resize(out_.size() + n);
    return *this;
  }
  // A Tensor argument (or a present Tensor?) at position `edge`; g may be undefined.
  Grads& tensor(size_t edge, const at::Tensor& g) {
    out_.push_back(g.defined() && ctx_->needs_input_grad(edge) ? g : at::Tensor());
    return *this;
  }
  // A Tensor[] argument whose n tensors start at position `edge`; gs empty: no gradient.
  Grads& list(size_t edge, size_t n, const std::vector<at::Tensor>& gs) {
    for (size_t i = 0; i < n; ++i) tensor(edge + i, gs.empty() ? at::Tensor() : gs[i]);
    return *this;
  }
  variable_list take() {
    if (!create_graph_) return std::move(out_);
    // What the gradients depend on: the op's inputs (the edges of the node being evaluated) and
    // the incoming gradients.
    torch::autograd::edge_list edges;
    if (const auto node = torch::autograd::get_current_node()) {
      for (const auto& e : node->next_edges()) {
        if (e.is_valid()) edges.push_back(e);
      }
    }
    variable_list incoming;
    for (const at::Tensor& t : grad_outputs_) {
      if (t.defined() && t.requires_grad()) incoming.push_back(t);
    }
    for (auto& e : torch::autograd::collect_next_edges(incoming)) edges.push_back(std::move(e));
    if (edges.empty()) return std::move(out_);  // constants of everything: nothing to differentiate
    auto error = std::make_shared<torch::autograd::Error>(
        "tbd_ops: the gradients of tbd_ops operators are not differentiable (no double backward); "
        "a second derivative through them is not supported",
        std::move(edges));
    variable_list out;
    for (const at::Tensor& g : out_) {
      if (!g.defined()) {
        out.push_back(g);
        continue;
      }
      at::Tensor r = g.tensor_data();  // a new tensor on the same storage, without autograd history
      torch::autograd::set_history(r, error);
      out.push_back(std::move(r));
    }
    return out;
  }

 private:
  const AutogradContext* ctx_;
  const variable_list& grad_outputs_;
  bool create_graph_;
  std::optional<at::NoGradGuard> no_grad_;
  variable_list out_;
};

// Tensors [begin, begin + n) of a flat list (the saved tensors, the incoming gradients).
inline std::vector<at::Tensor> slice(const variable_list& v, size_t begin, size_t n) {
  return std::vector<at::Tensor>(v.begin() + begin, v.begin() + begin + n);
}

inline variable_list concat(std::initializer_list<const std::vector<at::Tensor>*> parts) {
  variable_list out;
  for (const auto* p : parts) out.insert(out.end(), p->begin(), p->end());
  return out;
}

// Outputs that are not differentiable, detached from the node. (Not ctx->mark_non_differentiable:
// compiled autograd, torch._dynamo.compiled_autograd, rejects a C++ node that marks outputs.)
inline std::vector<at::Tensor> detached(std::vector<at::Tensor> ts) {
  for (at::Tensor& t : ts) t = t.detach();
  return ts;
}

// The optional tensor as a possibly undefined tensor (save_for_backward takes those).
inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
inline std::optional<at::Tensor> to_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace autograd
}  // namespace tbd_ops
