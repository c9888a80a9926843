// Memory for one large CPU output: 2 MiB-aligned, asked of the OS as huge pages, owned by a
// small object that rnl_fast.ops wraps in a tensor (torch.frombuffer) and frees with it.
//
// Why aligned: torch's CPU allocator places a large tensor wherever glibc does, 64 bytes into a
// page and some hundred KB past a 2 MiB boundary, so the first and last partial huge pages of
// every output (and the whole of a 4–8 MiB one) fault in 4 KB at a time: 1,672 faults per IF
// forward call at T = 32, 2M neurons against 142 when all three outputs start on a 2 MiB
// boundary, and 1.25× the time of a clone of its input into fresh huge pages against 1.13×
// (probe, 2-core VM).
// The memory comes from posix_memalign, so glibc's heap keeps and reuses it as it keeps any other
// block (rnl_fast.reuse_freed_memory), and the size is exact: the tail after the last whole
// huge page stays on 4 KB pages rather than rounding every output up by as much as 2 MiB.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace rnl_fast {

// The huge page size on x86-64 and arm64 Linux (transparent huge pages).
constexpr std::size_t kHugePage = std::size_t{2} << 20;

class HugePageBuffer {
 public:
  // nbytes of uninitialised memory starting on a 2 MiB boundary; with advise, the whole huge pages
  // in it are advised MADV_HUGEPAGE before anything touches them. Throws std::bad_alloc.
  HugePageBuffer(std::size_t nbytes, bool advise) : nbytes_(nbytes) {
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, nbytes == 0 ? 1 : nbytes) != 0) throw std::bad_alloc();
    data_ = data;
    const std::size_t whole = nbytes / kHugePage * kHugePage;
#ifdef MADV_HUGEPAGE
    // A hint: refused where the kernel has no transparent huge pages, and then the memory is
    // still aligned and usable.
    advised_ = advise && whole > 0 && madvise(data_, whole, MADV_HUGEPAGE) == 0;
#else
    (void)whole;
    (void)advise;
#endif
  }
  ~HugePageBuffer() { std::free(data_); }
  HugePageBuffer(const HugePageBuffer&) = delete;
  HugePageBuffer& operator=(const HugePageBuffer&) = delete;

  void* data() const { return data_; }
  std::size_t nbytes() const { return nbytes_; }
  // Whether the OS took the huge-page advice for the whole huge pages of the buffer.
  bool advised() const { return advised_; }

 private:
  void* data_ = nullptr;
  std::size_t nbytes_ = 0;
  bool advised_ = false;
};

}  // namespace rnl_fast
