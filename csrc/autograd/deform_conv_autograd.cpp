// Autograd for dcnlab::deform_conv, in C++ (as torchvision does for its deform_conv2d), so that a
// forward + backward of a small layer spends no time in Python: the op's autograd glue used to be
// ~70-100 us of host time per call (torch.library.register_autograd), which is most of a small
// layer's step. The backward is the dcnlab::deform_conv_backward op, called through the
// dispatcher; under create_graph=True its own autograd kernel (registered in Python) makes a
// double backward raise.
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>

namespace dcnlab {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DeformConvFunction : public torch::autograd::Function<DeformConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& offset,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dcnlab::deform_conv", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                                 at::IntArrayRef, const std::optional<at::Tensor>&)>();
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_mask = mask.has_value() && mask->defined();
    ctx->save_for_backward({input, offset, weight, has_mask ? *mask : at::Tensor()});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = has_bias;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(input, offset, weight, bias, stride, padding, dilation, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("dcnlab::deform_conv_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                std::array<bool, 5>)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& offset = saved[1];
    const at::Tensor& weight = saved[2];
    const at::Tensor& mask = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensor arguments that were given: input, offset, weight, then
    // bias and mask where present.
    const size_t bias_edge = 3;
    const size_t mask_edge = has_bias ? 4 : 3;
    const std::array<bool, 5> output_mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                          ctx->needs_input_grad(2), has_bias && ctx->needs_input_grad(bias_edge),
                                          mask.defined() && ctx->needs_input_grad(mask_edge)};
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    // Only a backward that builds a graph (create_graph=True) goes through the backward op's
    // autograd kernel, which makes a later double backward raise; otherwise skip that layer.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!c10::GradMode::is_enabled()) below_autograd.emplace();
    auto [grad_input, grad_offset, grad_weight, grad_bias, grad_mask] =
        op.call(grad_outputs[0], input, offset, weight, mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt,
                stride, padding, dilation, output_mask);
    const auto wanted = [&](at::Tensor grad, bool requested) { return requested ? grad : at::Tensor(); };
    // One entry per forward argument; the int lists get none.
    return {wanted(grad_input, output_mask[0]), wanted(grad_offset, output_mask[1]),
            wanted(grad_weight, output_mask[2]), wanted(grad_bias, output_mask[3]),
            at::Tensor(), at::Tensor(), at::Tensor(), wanted(grad_mask, output_mask[4])};
  }
};

at::Tensor deform_conv_autograd(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
  return DeformConvFunction::apply(input, offset, weight, bias, stride, padding, dilation, mask);
}

}  // namespace
}  // namespace dcnlab

TORCH_LIBRARY_IMPL(dcnlab, Autograd, m) { m.impl("deform_conv", &dcnlab::deform_conv_autograd); }
