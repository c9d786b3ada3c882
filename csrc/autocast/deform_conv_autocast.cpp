// Autocast for dcnlab::deform_conv: the op runs in the autocast dtype (bf16 or fp16), it is
// not upcast to fp32. fp64 tensors are left alone, as autocast does for every op.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace dcnlab {
namespace {

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor deform_conv_autocast(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dcnlab::deform_conv", "").typed<decltype(deform_conv_autocast<autocast_key, device_type>)>();
  return op.call(cast(input), cast(offset), cast(weight), cast(bias), stride, padding, dilation, cast(mask));
}

}  // namespace
}  // namespace dcnlab

TORCH_LIBRARY_IMPL(dcnlab, AutocastCPU, m) {
  m.impl("deform_conv", &dcnlab::deform_conv_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(dcnlab, AutocastCUDA, m) {
  m.impl("deform_conv", &dcnlab::deform_conv_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
